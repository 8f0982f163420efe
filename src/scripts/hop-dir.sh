# clan: makes the private directory of the build host's shared connections to targets (the
# second hop), then runs the command. The directory must be this user's own, and not a
# link, before any socket goes in it: a socket there lets its owner run commands on the
# target. Arguments: DIRECTORY COMMAND...
d=$1
shift
mkdir -m 0700 "$d" 2>/dev/null
if [ ! -d "$d" ] || [ -L "$d" ] || [ ! -O "$d" ]; then
	echo "clan: $d is not a private directory of $(id -un): the copy to the target cannot share its connection" >&2
	exit 1
fi
chmod 0700 "$d" || exit 1
exec "$@"
