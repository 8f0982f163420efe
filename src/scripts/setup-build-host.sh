# clan: the build host's and the target's side of `clan machines setup-build-host`.
# A key path's leading "~/" means the user's home.
#   key-show KEY             print KEY's public key (exit 3: there is no such key)
#   key-create KEY COMMENT   create an ed25519 key KEY without passphrase, unless it exists
#   known-add LINE...        append known_hosts lines (the target's verified host keys)
#   authorize KEY BLOB MODE  authorize the public KEY (whose base64 is BLOB) unless a line
#                            has it already; MODE dry only says: present, absent or added
cmd=$1
shift
home_path() {
	# The literal "~/" of the argument, not the shell's tilde.
	# shellcheck disable=SC2088
	case $1 in
	"~/"*) printf '%s\n' "$HOME/${1#"~/"}" ;;
	*) printf '%s\n' "$1" ;;
	esac
}
case $cmd in
key-show)
	k=$(home_path "$1")
	if [ -f "$k.pub" ]; then
		cat "$k.pub"
	elif [ -f "$k" ]; then
		ssh-keygen -y -f "$k"
	else
		exit 3
	fi
	;;
key-create)
	k=$(home_path "$1")
	test -e "$k" && exit 0
	# 0700 for the directory it creates (~/.ssh), not for the existing ones above it.
	# shellcheck disable=SC2174
	mkdir -p -m 700 "$(dirname "$k")" && ssh-keygen -q -t ed25519 -N "" -C "$2" -f "$k"
	;;
known-add)
	umask 077
	mkdir -p "$HOME/.ssh" && printf '%s\n' "$@" >>"$HOME/.ssh/known_hosts"
	;;
authorize)
	if grep -qsF -- "$2" "$HOME/.ssh/authorized_keys"; then
		echo present
	elif [ "$3" = dry ]; then
		echo absent
	else
		umask 077
		mkdir -p "$HOME/.ssh" && printf '%s\n' "$1" >>"$HOME/.ssh/authorized_keys" && echo added
	fi
	;;
*)
	echo "clan-setup-build-host: unknown command $cmd" >&2
	exit 2
	;;
esac
