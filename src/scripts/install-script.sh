# clan: installs one of clan's scripts and runs it. Arguments: PATH TEXT ARGUMENTS...
# The script is written to PATH (root-only, once per version: the name carries a hash of
# the text), aside first and then renamed, so there is never half a script; then it runs
# with ARGUMENTS.
umask 077
f=$1
t=$2
shift 2
if [ ! -f "$f" ]; then
	mkdir -p "${f%/*}" && printf '%s\n' "$t" >"$f.$$" && mv -f "$f.$$" "$f" || exit 1
fi
exec sh "$f" "$@"
