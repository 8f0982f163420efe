# clan: what a target has of the system being deployed. Arguments: PROFILE NEW_SYSTEM.
# Exit 0: it runs it (the running system, or the profile's where none is recorded);
# 1: it has it in its store; 2: it lacks it. Running it, it prints "profile-current" when
# the system profile points to it as well.
nix-store --check-validity "$2" 2>/dev/null || exit 2
c=/run/current-system
[ -e "$c" ] || c=$1
[ "$(readlink -f "$c")" = "$2" ] || exit 1
# Running it: say whether the profile points to it too (then a switch changes nothing).
if [ "$(readlink -f "$1")" = "$2" ]; then echo profile-current; fi
