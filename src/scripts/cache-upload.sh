# clan: signs a system's closure on the build host and copies it to a binary cache.
# Arguments: SYSTEM UPLOAD_STORE_URL. The key is the build host's own,
# ~/.config/clan/binary-cache.sec (made by `clan machines setup-cache`); exit 3 without it.
key="$HOME/.config/clan/binary-cache.sec"
if [ ! -r "$key" ]; then
	echo "no signing key at $key: run clan machines setup-cache on the workstation" >&2
	exit 3
fi
nix --extra-experimental-features nix-command store sign --key-file "$key" --recursive "$1" || exit 1
exec nix --extra-experimental-features nix-command copy --to "$2" "$1"
