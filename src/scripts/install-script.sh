# clan: installs one of clan's scripts and runs it. Arguments: PATH TEXT ARGUMENTS...
# The script is written to PATH (root-only, once per version: the name carries a hash of
# the text), aside first and then renamed, so there is never half a script; then it runs
# with ARGUMENTS. Nothing found there is trusted: its directory must be a real directory
# owned by the user running this (root) and writable by nobody else, else
# nothing runs (exit 126, "clan: unsafe ..."); an installed script is used only if it is a
# regular file of that user, writable by nobody else, with exactly the expected text, else
# it is replaced.
umask 077
f=$1
t=$2
shift 2
d=${f%/*}
me=$(id -u)
unsafe() {
	echo "clan: unsafe $d: $1; nothing was run (remove it, or make it root's own directory, mode 0755 or stricter)" >&2
	exit 126
}
# Writable by group or others (the mode's 022 bits).
shared_mode() { [ $((0$(stat -c %a "$1") & 022)) -ne 0 ]; }
if [ -L "$d" ]; then unsafe "it is a symbolic link"; fi
if [ -e "$d" ] && [ ! -d "$d" ]; then unsafe "it is not a directory"; fi
mkdir -p "$d" || exit 1
if [ "$(stat -c %u "$d")" != "$me" ]; then unsafe "it belongs to user $(stat -c %u "$d"), not $me"; fi
if shared_mode "$d"; then unsafe "others may write to it (mode $(stat -c %a "$d"))"; fi
if [ -L "$f" ] || [ ! -f "$f" ] || [ "$(stat -c %u "$f")" != "$me" ] || shared_mode "$f" ||
	[ "$(cat "$f")" != "$(printf '%s\n' "$t")" ]; then
	printf '%s\n' "$t" >"$f.$$" && mv -f "$f.$$" "$f" || exit 1
fi
exec sh "$f" "$@"
