# clan: the change summary, run on the target. Arguments: PROFILE NEW_SYSTEM.
# The new system against the running one (else the profile's); exit 0 without a word when
# there is no current system (a first deploy: nothing to compare with).
cur=/run/current-system
[ -e "$cur" ] || cur=$1
[ -e "$cur" ] || exit 0
exec nix --extra-experimental-features nix-command store diff-closures "$cur" "$2"
