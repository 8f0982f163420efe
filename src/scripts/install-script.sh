# clan: installs one of clan's scripts and runs it. Arguments: PATH TEXT ARGUMENTS...
# The script is written to PATH (root-only, once per version: the name carries a hash of
# the text), aside first and then renamed, so there is never half a script; then it runs
# with ARGUMENTS. Nothing found there is trusted: its directory must be a real directory
# owned by the user running this (root) and writable by nobody else, else
# nothing runs (exit 126, "clan: unsafe ..."); an installed script is used only if it is a
# regular file of that user, writable by nobody else, with exactly the expected text, else
# it is replaced. It runs before every step on a target, so the checks take two processes
# (stat, cat) where the shell's own tests can tell.
umask 077
f=$1
t=$2
shift 2
d=${f%/*}
unsafe() {
	echo "clan: unsafe $d: $1; nothing was run (remove it, or make it root's own directory, mode 0755 or stricter)" >&2
	exit 126
}
if [ -L "$d" ]; then unsafe "it is a symbolic link"; fi
if [ ! -d "$d" ]; then
	if [ -e "$d" ]; then unsafe "it is not a directory"; fi
	mkdir -p "$d" || exit 1
fi
if [ ! -O "$d" ]; then unsafe "it belongs to user $(stat -c %u "$d"), not $(id -u)"; fi
# The modes of the directory and of the script (when there is one), in one call.
dmode=
fmode=
{
	read -r dmode
	read -r fmode
} <<MODES
$(stat -c %a "$d" "$f" 2>/dev/null)
MODES
# Writable by group or others (the mode's 022 bits).
shared() { [ $((0$1 & 022)) -ne 0 ]; }
if shared "$dmode"; then unsafe "others may write to it (mode $dmode)"; fi
if [ -L "$f" ] || [ ! -f "$f" ] || [ ! -O "$f" ] || shared "${fmode:-777}" ||
	[ "$(cat "$f")" != "$(printf '%s\n' "$t")" ]; then
	printf '%s\n' "$t" >"$f.$$" && mv -f "$f.$$" "$f" || exit 1
fi
exec sh "$f" "$@"
