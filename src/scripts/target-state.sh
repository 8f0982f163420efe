# clan: what a target has of the system being deployed. Arguments: PROFILE NEW_SYSTEM.
# Exit 0: it runs it (the running system, or the profile's where none is recorded);
# 1: it has it in its store; 2: it lacks it.
nix-store --check-validity "$2" 2>/dev/null || exit 2
c=/run/current-system
[ -e "$c" ] || c=$1
[ "$(readlink -f "$c")" = "$2" ] || exit 1
