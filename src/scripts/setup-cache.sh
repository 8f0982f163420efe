# clan: makes the build host's binary-cache signing key, once, and prints its public key.
# Arguments: KEY_NAME [UPLOAD_STORE_URL]. The key pair is ~/.config/clan/binary-cache.{sec,pub}
# (never overwritten); with UPLOAD_STORE_URL the cache is opened once, which creates a
# file:// cache's directory and nix-cache-info.
d="$HOME/.config/clan"
umask 077
mkdir -p "$d" || exit 1
if [ ! -f "$d/binary-cache.sec" ]; then
	nix-store --generate-binary-cache-key "$1" "$d/binary-cache.sec" "$d/binary-cache.pub" || exit 1
	echo "clan: created"
fi
if [ -n "${2:-}" ]; then
	nix --extra-experimental-features nix-command store ping --store "$2" >/dev/null || exit 1
fi
printf 'clan: public-key %s\n' "$(cat "$d/binary-cache.pub")"
