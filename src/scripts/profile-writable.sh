# clan: whether this user can set the system profile: the first existing directory on the
# way to /nix/var/nix/profiles must be writable. Exit 0: it can; 1: it cannot.
for d in /nix/var/nix/profiles /nix/var/nix /nix/var /nix; do
	if [ -e "$d" ]; then
		test -w "$d"
		exit
	fi
done
exit 1
