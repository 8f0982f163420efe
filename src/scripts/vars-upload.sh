# clan: receives a machine's vars on the target. Standard input is a tar of its private key
# (key.txt) and its encrypted secrets; it is unpacked into a new directory beside LOCATION,
# checked (FILES files, key.txt among them), made root-only (0700 directories, 0400 files)
# and swapped in with one rename of the LOCATION symlink: a failed or interrupted upload
# leaves the previous secrets in place. Arguments: LOCATION FILES
set -eu
umask 077
loc=$1
count=$2
store="$loc.d"
mkdir -p "$store"
chmod 0700 "$store"
new=$(mktemp -d "$store/new.XXXXXX")
trap 'rm -rf "$new"' EXIT
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
# A plain directory from elsewhere is set aside once (the only moment without secrets).
if [ -d "$loc" ] && [ ! -L "$loc" ]; then
	mv "$loc" "$store/previous.$$"
fi
# Relative: LOCATION.d/v.* beside it, whatever the path it is seen through.
ln -s "${store##*/}/${version##*/}" "$loc.new.$$"
mv -T "$loc.new.$$" "$loc"
for old in "$store"/*; do
	if [ "$old" != "$version" ]; then rm -rf "$old"; fi
done
echo "clan: $count files in $loc"
