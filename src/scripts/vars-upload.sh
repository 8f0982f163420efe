# clan: receives a machine's vars on the target. Standard input is a tar of its private key
# (key.txt) and its encrypted secrets; it is unpacked into a new directory beside LOCATION,
# checked (FILES files, key.txt among them), made root-only (0700 directories, 0400 files)
# and swapped in with one rename of the LOCATION symlink: a failed or interrupted upload
# leaves the previous secrets in place. Arguments: LOCATION FILES
#
# It only ever replaces what clan put there: LOCATION.d is clan's own (marked by a file
# .clan-vars in it), LOCATION a symlink into it. A LOCATION that is a directory with files, a
# file, or a symlink elsewhere, and a LOCATION.d that is not clan's, are refused (exit 3,
# "clan: refused ..."), changing nothing; an empty directory at LOCATION is replaced, and one
# that holds exactly the uploaded files (put there by clan-core) is left as it is (exit 0).
set -eu
umask 077
loc=$1
count=$2
store="$loc.d"
refuse() {
	echo "clan: refused $loc: $1; nothing was changed (move it away, or choose another clan.core.vars.age.secretLocation)" >&2
	exit 3
}
# The store: clan's own, or made now (and marked); one an earlier clan made holds only its
# versions (v.*), staging directories (new.*) and a set-aside directory (previous.*).
if [ -L "$store" ] || { [ -e "$store" ] && [ ! -d "$store" ]; }; then
	refuse "$store is not a directory of clan's"
fi
if [ -d "$store" ] && [ ! -e "$store/.clan-vars" ]; then
	for e in "$store"/* "$store"/.[!.]*; do
		[ -e "$e" ] || [ -L "$e" ] || continue
		case ${e##*/} in v.* | new.* | previous.*) ;; *) refuse "$store holds files clan did not put there" ;; esac
	done
fi
case $(readlink "$loc" 2>/dev/null || true) in
"" | "${store##*/}"/v.*) ;;
*) refuse "it is a symbolic link that clan did not make" ;;
esac
if [ -e "$loc" ] && [ ! -L "$loc" ]; then
	if [ ! -d "$loc" ]; then refuse "it is a file"; fi
	if [ -n "$(ls -A "$loc")" ]; then
		# A directory another tool filled (clan-core's upload, say) with exactly these
		# files is left as it is; anything else in it is the user's.
		check=$(mktemp -d "$loc.check.XXXXXX")
		trap 'rm -rf "$check"' EXIT
		if tar -x -f - -C "$check" --no-same-owner && diff -r -q "$check" "$loc" >/dev/null 2>&1; then
			echo "clan: $loc holds these $count files already; nothing was changed"
			exit 0
		fi
		refuse "it is a directory with files that clan did not put there"
	fi
fi
mkdir -p "$store"
chmod 0700 "$store"
: >"$store/.clan-vars"
# What an upload cut off (killed, its session gone) left behind, before this one.
for old in "$store"/new.*; do
	[ -e "$old" ] || continue
	rm -rf "$old"
	echo "clan: removed ${old##*/}, the staging copy of an upload that was cut off" >&2
done
new=$(mktemp -d "$store/new.XXXXXX")
trap 'rm -rf "$new"' EXIT
trap 'exit 1' HUP INT TERM PIPE
if ! tar -x -f - -C "$new" --no-same-owner; then
	echo "clan: the upload to $loc ended before it was whole: the previous secrets stay in place" >&2
	exit 1
fi
got=$(find "$new" -type f | wc -l)
if [ "$got" -ne "$count" ] || [ ! -f "$new/key.txt" ]; then
	echo "clan: the upload to $loc holds $got files, not $count: the previous secrets stay in place" >&2
	exit 1
fi
find "$new" -type d -exec chmod 0700 {} +
find "$new" -type f -exec chmod 0400 {} +
chown -R 0:0 "$new"
version="$store/v.${new##*/new.}"
mv "$new" "$version"
trap - EXIT
# An empty directory at LOCATION (made by hand, or by an earlier activation) gives way.
if [ -d "$loc" ] && [ ! -L "$loc" ]; then rmdir "$loc"; fi
# Relative: LOCATION.d/v.* beside it, whatever the path it is seen through.
ln -s "${store##*/}/${version##*/}" "$loc.new.$$"
mv -T "$loc.new.$$" "$loc"
for old in "$store"/*; do
	if [ "$old" != "$version" ]; then rm -rf "$old"; fi
done
echo "clan: $count files in $loc"
