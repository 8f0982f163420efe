# clan: runs one of clan's scripts as root through sudo, by a fixed path with short
# arguments, so that sudo logs one short line per call and a sudoers rule can allow exactly
# these scripts. Runs as the login user. Arguments: PASSWORD NAME TEXT INSTALL ARGUMENTS...
#   PASSWORD  1: the first line of standard input is the sudo password, handed to sudo only
#             (SUDO_ASKPASS=printenv; never on a command line, never on the script's input);
#             0: sudo --non-interactive.
#   NAME      the script's name (clan-activate, clan-vars-upload).
#   TEXT      its text; it runs as /run/clan/NAME-HASH.sh, HASH the first 16 hex digits of
#             the sha256 of the file (a "#!/bin/sh" line, then TEXT).
#   INSTALL   the fixed install command (`sh -c INSTALL clan-install NAME`, the file on its
#             standard input), run through sudo when the script is not in place.
# The script is in place when /run/clan is a real directory of root's that nobody else may
# write to, and the file a regular file of root's, writable by nobody else, with exactly
# that text (checked here, before sudo runs it; only root could change it after).
# Exit codes: the script's; 126 an unsafe /run/clan or a failed install; sudo's own (1)
# when it refuses.
# sudo's flags, one word each (split on purpose where they are used).
flags=--non-interactive
if [ "$1" = 1 ]; then
	IFS= read -r CLAN_SUDO_PASSWORD || exit 1
	export CLAN_SUDO_PASSWORD
	SUDO_ASKPASS=$(command -v printenv) || exit 1
	export SUDO_ASKPASS
	flags="-k -A -p CLAN_SUDO_PASSWORD"
fi
name=$2
text=$3
install=$4
shift 4
d=/run/clan
file() { printf '#!/bin/sh\n%s\n' "$text"; }
f=$d/$name-$(file | sha256sum | cut -c1-16).sh
# Owned by root, not writable by group or others (the mode's 022 bits).
roots() { [ ! -L "$1" ] && [ "$(stat -c %u "$1")" = 0 ] && [ $((0$(stat -c %a "$1") & 022)) -eq 0 ]; }
in_place() {
	[ -d "$d" ] && roots "$d" && [ -f "$f" ] && roots "$f" && [ "$(cat "$f" 2>/dev/null)" = "$(file)" ]
}
if ! in_place; then
	# shellcheck disable=SC2086
	file | sudo $flags -- /bin/sh -c "$install" clan-install "$name" || exit
	if ! in_place; then
		echo "clan: unsafe $d or $f after installing it; nothing was run" >&2
		exit 126
	fi
fi
# shellcheck disable=SC2086
exec sudo $flags -- "$f" "$@"
