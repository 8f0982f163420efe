# clan: ends the build host's shared connections to targets (the second hop) and removes
# their directory and the run's GC-root directory. Arguments: HOP_DIRECTORY ROOT_DIRECTORY
for s in "$1"/*; do
	if [ -S "$s" ]; then ssh -o ControlPath="$s" -O exit clan-hop >/dev/null 2>&1; fi
done
rm -rf -- "$1" "$2"
