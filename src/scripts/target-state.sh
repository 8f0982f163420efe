# clan: what a target has of the system being deployed. Arguments: PROFILE NEW_SYSTEM.
# Exit 0: it runs it (the running system, or the profile's where none is recorded) and no
# activation is pending; 1: it has it in its store (and may run it, unconfirmed: see
# "pending"); 2: it lacks it. Running it, it prints "profile-current" when the system profile
# points to it as well. Each activation that an earlier run left unconfirmed (its record in
# /run/clan, which its watchdog acts on) is a line "pending RUN", or "pending unknown" when
# /run/clan cannot be read: the system it runs is then not known to be good.
nix-store --check-validity "$2" 2>/dev/null || exit 2
pending=
if [ -d /run/clan ] && [ ! -r /run/clan ]; then
	echo "pending unknown"
	pending=1
fi
for r in /run/clan/activation-*; do
	[ -d "$r" ] || continue
	echo "pending ${r##*/activation-}"
	pending=1
done
c=/run/current-system
[ -e "$c" ] || c=$1
[ "$(readlink -f "$c")" = "$2" ] || exit 1
# Running it: say whether the profile points to it too (then a switch changes nothing).
if [ "$(readlink -f "$1")" = "$2" ]; then echo profile-current; fi
[ -z "$pending" ] || exit 1
