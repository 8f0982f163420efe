#!/bin/sh
# clan-activate: the target's side of an activation. Runs as root on the target, installed
# by the workstation at /run/clan/clan-activate-<hash>.sh (see RemoteCommand::Script).
#
# Usage: clan-activate.sh COMMAND RUN [ARGUMENTS]
#   RUN is the deploy's run id (hex). State lives in /run/clan (root only, gone at reboot):
#   lock (the deploy lock), holder (who holds it), act (held while a watchdog acts or is
#   stood down), activation-RUN/ (one activation: action, generations, watchdog, switch).
#
#   lock RUN WHO SECONDS [STALE]
#       Take the target's deploy lock, waiting at most SECONDS (printing "clan: waiting
#       HOLDER" once), print "clan: acquired" and hold it until standard input ends: the
#       deploy's ssh session, so a killed workstation releases it. With STALE, the
#       workstation also sends a byte every few seconds, and STALE seconds without one
#       release the lock: a workstation that is gone without closing its connection (its
#       network cut, its lid closed) does not hold the target for the hours TCP would wait.
#       Exit 75: still held.
#   prepare RUN ACTION TOPLEVEL TIMEOUT
#       Under the lock: stand down what earlier runs left pending (their switch is waited
#       for, their watchdog stopped), record the current generation ("clan: previous N
#       PATH"), arm this run's watchdog (TIMEOUT > 0, ACTION switch or test), set the
#       profile (switch, boot: "clan: profile N PATH").
#   switch RUN ACTION TOPLEVEL SPECIALISATION NO_CHECK
#       TOPLEVEL's switch-to-configuration ACTION (SPECIALISATION's, unless it is "-"; with
#       NIXOS_NO_CHECK=1 when NO_CHECK is 1), in a transient unit where systemd runs (a lost
#       ssh session cannot stop it half-way), telling the watchdog when it starts and ends.
#       Exits with its status.
#   watchdog RUN
#       Waits for the switch to end, then TIMEOUT seconds; unless the activation was
#       confirmed by then, rolls back to the recorded generation (see back_to).
#   confirm RUN
#       Stands the watchdog down: exit 0 "clan: confirmed"; 4, it rolled back already
#       ("clan: rolled-back ..."); 5, no such activation (a later deploy took over).
#   outcome RUN
#       After the workstation lost its ssh session during the switch: waits for the switch
#       to end, then exit 0 "clan: switched 0"; 1 "clan: switched N" (it failed); 4, 5 as
#       for confirm; 6 "clan: switch-never-started"; 7 "clan: switch-killed" (it ended
#       without a status). Changes nothing but the record of a run without watchdog.
#   undo RUN
#       After a failed switch: stands the watchdog down and goes back to the recorded
#       generation, deleting the failed one. Prints "clan: profile N PATH". Exit 4, 5 as
#       for confirm: the watchdog went back already, or another deploy took over.
#   revert RUN
#       After a health check failed: back to the generation prepare recorded, the current
#       (unhealthy) one deleted. Prints "clan: profile N PATH". Exit 76 (nothing done) when
#       this run no longer holds the lock.
#   generations RUN
#       Lists the system profile's generations ("clan: generation N PATH") and the current
#       one ("clan: current N"). Changes nothing.
#   rollback RUN SECONDS GEN
#       `clan machines rollback`: under the lock (waiting at most SECONDS), back to
#       generation GEN (which the workstation chose and showed); exit 3 if GEN is no other
#       generation of the profile.
#
# Exit codes: 0 done; 1 failed; 2 bad arguments; 3 no generation to go back to; 4, 5 as
# for confirm; 6, 7 as for outcome; 75 lock held by another deploy; 76 (prepare, switch, revert) this run no longer
# holds the lock: it was let go after STALE seconds without a sign of the workstation.
# Lines starting with "clan: " are for the workstation; the rest is for the run's log.

set -u
D=/run/clan
P=/nix/var/nix/profiles/system
SELF=$0

if [ $# -lt 2 ]; then
	echo "usage: $0 COMMAND RUN [ARGUMENTS]" >&2
	exit 2
fi
cmd=$1
run=$2
shift 2
case $run in
'' | *[!0-9a-f]*)
	echo "clan-activate: bad run id" >&2
	exit 2
	;;
esac
umask 077
# Readable by all (its records hold no secret): the up-to-date check, which runs as the
# login user, must see an activation that is still pending.
mkdir -p "$D" && chmod 755 "$D" || exit 1
R="$D/activation-$run"

say() { printf 'clan: %s\n' "$*"; }

has_systemd() { [ -d /run/systemd/system ]; }

# The generation number a profile link points to (system-12-link: 12), or nothing.
gen_of() {
	l=$(readlink "$1" 2>/dev/null) || return 0
	n=${l##*/}
	n=${n#system-}
	n=${n%-link}
	case $n in
	'' | *[!0-9]*) ;;
	*) echo "$n" ;;
	esac
}

# COMMAND... in a transient unit named UNIT, its output piped back, waiting for its end.
# Exit statuses 200-243 are systemd's own (EXIT_CGROUP, EXIT_EXEC, ...): the unit could not
# start its command, which never ran, so it is tried again (under a fresh name, the failed
# unit may not be collected yet), three times at most.
in_unit() {
	unit=$1
	shift
	try=1
	while :; do
		systemd-run -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER -E PATH --collect \
			--no-ask-password --pipe --quiet --service-type=exec --unit="$unit" \
			--wait "$@" </dev/null
		s=$?
		if [ $s -lt 200 ] || [ $s -gt 243 ] || [ $try -ge 3 ]; then return $s; fi
		echo "the unit $unit could not start its command (systemd's exit status $s): trying again" >&2
		try=$((try + 1))
		unit=${unit%-try*}-try$try
		sleep 1
	done
}

# SYSTEM's switch-to-configuration ACTION; in a transient unit (named after UNIT) where
# systemd runs, its output piped back.
run_switch() {
	if has_systemd; then
		in_unit "clan-switch-$3" "$1/bin/switch-to-configuration" "$2"
	else
		"$1/bin/switch-to-configuration" "$2" </dev/null
	fi
}

# The one way back, for the watchdog, the undo of a failed switch and `clan machines
# rollback`: the profile to generation GEN exactly, generation BAD (if any) deleted so that
# nothing ever goes back to it and the boot menu no longer offers it, then GEN's system's
# switch-to-configuration WORD.
back_to() {
	gen=$1
	bad=$2
	word=$3
	if [ -z "$gen" ]; then
		echo "no previous generation to go back to" >&2
		return 3
	fi
	nix-env -p "$P" --switch-generation "$gen" >&2 || return 1
	if [ -n "$bad" ] && [ "$bad" != "$gen" ]; then
		nix-env -p "$P" --delete-generations "$bad" >&2 || echo "warning: cannot delete generation $bad" >&2
	fi
	sys=$(readlink -f "$P")
	say "profile $gen $sys"
	run_switch "$sys" "$word" "$run-back"
}

# Stops the watchdog of run $1 (record $2), whatever runs it.
stop_watchdog() {
	# Without waiting for the stop to finish: the watchdog acts only while its record
	# exists, checked under the act lock, and callers remove the record under that lock.
	# (A blocking stop can wait for the unit's stop timeout where systemd misses the end
	# of the unit's processes, as on cgroup v1.)
	if has_systemd; then systemctl stop --no-block "clan-watchdog-$1.service" 2>/dev/null; fi
	if [ -s "$2/watchdog-pid" ]; then
		w=$(cat "$2/watchdog-pid")
		kill -TERM "-$w" 2>/dev/null || kill -TERM "$w" 2>/dev/null
	fi
	return 0
}

# Takes the deploy lock (fd 9, held until the calling command exits), waiting at most $1
# seconds and saying who holds it; exit 75 if it stays held.
take_lock() {
	exec 9>>"$D/lock"
	if ! flock -n 9; then
		say "waiting $(cat "$D/holder" 2>/dev/null)"
		if ! flock -w "$1" 9; then
			say "busy $(cat "$D/holder" 2>/dev/null)"
			exit 75
		fi
	fi
}

# Stops unless this run still holds the deploy lock (the holder line names it): a lock let
# go after the workstation's silence may have been taken by another deploy since.
own_lock() {
	h=
	[ -r "$D/holder" ] && read -r h _ <"$D/holder"
	[ "$h" = "$run" ] && return 0
	say lock-lost
	exit 76
}

# Holds the act lock (fd 8) until the calling command exits.
act_lock() {
	exec 8>>"$D/act"
	flock 8
}

# What earlier runs left: wait for a switch of theirs that still runs, stop their watchdog,
# forget them. Their system stays for now: this run decides what the target runs, and their
# activation was never confirmed, so the generation they recorded as the one before theirs
# (the oldest, if several) is the last confirmed one: it becomes this run's way back
# ($inherited).
take_over() {
	act_lock
	inherited=
	for r in "$D"/activation-*; do
		[ -d "$r" ] || continue
		other=${r##*/activation-}
		[ "$other" = "$run" ] && continue
		if [ -s "$r/switch-pid" ] && [ ! -e "$r/switch-status" ]; then
			p=$(cat "$r/switch-pid")
			while kill -0 "$p" 2>/dev/null && [ ! -e "$r/switch-status" ]; do sleep 0.2; done
		fi
		stop_watchdog "$other" "$r"
		g=$(cat "$r/prev-gen" 2>/dev/null)
		case $g in
		'' | *[!0-9]*) ;;
		*) if [ -z "$inherited" ] || [ "$g" -lt "$inherited" ]; then inherited=$g; fi ;;
		esac
		rm -rf "$r"
		say "took-over $other"
	done
}

case $cmd in
lock)
	[ $# -eq 2 ] || [ $# -eq 3 ] || exit 2
	take_lock "$2"
	printf '%s %s %s\n' "$run" "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$D/holder"
	say acquired
	# Held while the session lasts (and, with STALE, while bytes keep coming); what reads
	# the input does not keep the lock.
	if [ $# -eq 3 ]; then
		while beat=$(timeout "$3" head -c 1 9>&-) && [ -n "$beat" ]; do :; done
	else
		cat >/dev/null 9>&-
	fi
	rm -f "$D/holder" "$D/previous-$run"
	;;
prepare)
	[ $# -eq 3 ] || exit 2
	own_lock
	action=$1
	top=$2
	timeout=$3
	trap '' HUP PIPE
	take_over
	prev=${inherited:-$(gen_of "$P")}
	rm -rf "$R"
	mkdir "$R" || exit 1
	echo "$action" >"$R/action"
	echo "$prev" >"$R/prev-gen"
	echo "$prev" >"$D/previous-$run"
	echo "$timeout" >"$R/timeout"
	if [ -n "$prev" ]; then
		say "previous $prev $(readlink -f "$P-$prev-link" 2>/dev/null || echo none)"
	else
		say "previous none none"
	fi
	# The watchdog first: a connection lost from here on is covered.
	if [ "$timeout" -gt 0 ] && { [ "$action" = switch ] || [ "$action" = test ]; }; then
		: >"$R/watchdog"
		if has_systemd; then
			systemd-run -E PATH --collect --no-ask-password --quiet \
				--unit="clan-watchdog-$run" sh "$SELF" watchdog "$run" || exit 1
		else
			setsid sh "$SELF" watchdog "$run" </dev/null >/dev/null 2>&1 8>&- &
		fi
	fi
	new=
	if [ "$action" = switch ] || [ "$action" = boot ]; then
		nix-env -p "$P" --set "$top" >&2 || exit 1
		new=$(gen_of "$P")
		[ "$new" = "$prev" ] && new=
		echo "$new" >"$R/new-gen"
		say "profile $(gen_of "$P") $(readlink -f "$P")"
	fi
	exec 8>&-
	;;
switch)
	[ $# -eq 4 ] || exit 2
	# dry-activate changes nothing and takes no lock.
	[ "$1" = dry-activate ] || own_lock
	if has_systemd; then
		in_unit "clan-switch-$run" sh "$SELF" switch-now "$run" "$@"
	else
		sh "$SELF" switch-now "$run" "$@" </dev/null
	fi
	s=$?
	# Without a watchdog there is nothing to confirm: the activation is over.
	if [ $s -eq 0 ] && [ -d "$R" ] && [ ! -e "$R/watchdog" ]; then rm -rf "$R"; fi
	exit $s
	;;
switch-now)
	[ $# -eq 4 ] || exit 2
	# A lost session does not stop the switch half-way where no unit holds it.
	trap '' HUP PIPE
	[ -d "$R" ] && echo $$ >"$R/switch-pid"
	bin="$2/bin/switch-to-configuration"
	if [ "$3" != - ]; then
		case $3 in '' | . | .. | */*) exit 2 ;; esac
		bin="$2/specialisation/$3/bin/switch-to-configuration"
	fi
	if [ "$4" = 1 ]; then
		NIXOS_NO_CHECK=1 "$bin" "$1"
	else
		"$bin" "$1"
	fi
	s=$?
	[ -d "$R" ] && echo $s >"$R/switch-status"
	# How it ended, kept after the record is gone (for outcome).
	echo $s >"$D/switched-$run"
	exit $s
	;;
outcome)
	[ $# -eq 0 ] || exit 2
	# Asked after the workstation lost its session during the switch: wait for the switch
	# to end, then say how it did.
	if [ -d "$R" ] && [ -s "$R/switch-pid" ]; then
		p=$(cat "$R/switch-pid")
		while [ -d "$R" ] && [ ! -e "$R/switch-status" ] && kill -0 "$p" 2>/dev/null; do sleep 0.2; done
	fi
	if [ ! -d "$R" ] && [ -e "$D/rolled-back-$run" ]; then
		say "rolled-back $(cat "$D/rolled-back-$run")"
		exit 4
	fi
	if [ -s "$D/switched-$run" ]; then
		s=$(cat "$D/switched-$run")
		say "switched $s"
		[ "$s" = 0 ] || exit 1
		# Without a watchdog there is nothing to confirm: the activation is over.
		if [ -d "$R" ] && [ ! -e "$R/watchdog" ]; then rm -rf "$R"; fi
		exit 0
	fi
	[ -d "$R" ] || exit 5
	if [ -s "$R/switch-pid" ]; then
		say "switch-killed"
		exit 7
	fi
	say "switch-never-started"
	exit 6
	;;
watchdog)
	trap '' HUP PIPE
	[ -d "$R" ] || exit 0
	exec >>"$D/watchdog-$run.log" 2>&1
	echo $$ >"$R/watchdog-pid"
	timeout=$(cat "$R/timeout")
	# The countdown starts when the switch has ended: first wait for it to start (at most
	# the timeout: the connection may have been lost before it did), then to end.
	i=0
	while [ -d "$R" ] && [ ! -e "$R/switch-pid" ] && [ $i -lt $((timeout * 5)) ]; do
		sleep 0.2
		i=$((i + 1))
	done
	if [ -s "$R/switch-pid" ]; then
		p=$(cat "$R/switch-pid")
		while [ -d "$R" ] && [ ! -e "$R/switch-status" ] && kill -0 "$p" 2>/dev/null; do sleep 0.2; done
	fi
	[ -d "$R" ] || exit 0
	date +%s >"$R/countdown"
	sleep "$timeout"
	act_lock
	[ -d "$R" ] || exit 0
	echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) not confirmed within ${timeout}s: rolling back"
	action=$(cat "$R/action")
	prev=$(cat "$R/prev-gen")
	new=$(cat "$R/new-gen" 2>/dev/null)
	if [ "$action" = test ]; then
		sys=$(readlink -f "$P")
		echo "profile $(gen_of "$P") $sys" >"$D/rolled-back-$run"
		rm -rf "$R"
		run_switch "$sys" test "$run-back"
	else
		echo "profile ${prev:-none} $(readlink -f "$P-$prev-link" 2>/dev/null)" >"$D/rolled-back-$run"
		rm -rf "$R"
		back_to "$prev" "$new" switch
	fi
	;;
confirm)
	act_lock
	if [ -d "$R" ]; then
		stop_watchdog "$run" "$R"
		rm -rf "$R" "$D/switched-$run"
		say confirmed
		exit 0
	fi
	if [ -e "$D/rolled-back-$run" ]; then
		say "rolled-back $(cat "$D/rolled-back-$run")"
		exit 4
	fi
	exit 5
	;;
undo)
	trap '' HUP PIPE
	act_lock
	if [ ! -d "$R" ]; then
		if [ -e "$D/rolled-back-$run" ]; then
			say "rolled-back $(cat "$D/rolled-back-$run")"
			exit 4
		fi
		echo "no activation of run $run is pending" >&2
		exit 5
	fi
	stop_watchdog "$run" "$R"
	action=$(cat "$R/action")
	prev=$(cat "$R/prev-gen")
	new=$(cat "$R/new-gen" 2>/dev/null)
	rm -rf "$R" "$D/switched-$run"
	case $action in
	test)
		# The profile was not touched: back to its system, if there is one.
		sys=$(readlink -f "$P") || exit 3
		say "profile $(gen_of "$P") $sys"
		run_switch "$sys" test "$run-back"
		;;
	*) back_to "$prev" "$new" "$action" ;;
	esac
	;;
revert)
	# After a confirmed activation that failed its health check: back to the generation
	# this run found, the unhealthy one deleted. Under the run's lock.
	trap '' HUP PIPE
	# Only while this run holds the lock: a deploy that took the target over since owns
	# what runs there now.
	own_lock
	[ -s "$D/previous-$run" ] || {
		echo "no previous generation recorded for run $run" >&2
		exit 3
	}
	back_to "$(cat "$D/previous-$run")" "$(gen_of "$P")" switch
	;;
generations)
	[ $# -eq 0 ] || exit 2
	# Read-only: every generation of the system profile, and the current one.
	for l in "$P"-*-link; do
		[ -L "$l" ] || continue
		n=${l##*/system-}
		n=${n%-link}
		case $n in '' | *[!0-9]*) continue ;; esac
		say "generation $n $(readlink -f "$l")"
	done
	say "current $(gen_of "$P")"
	;;
rollback)
	[ $# -eq 2 ] || exit 2
	trap '' HUP PIPE
	take_lock "$1"
	take_over
	cur=$(gen_of "$P")
	if [ -z "$cur" ]; then
		echo "there is no system profile" >&2
		exit 3
	fi
	# The generation the workstation showed the user (checked again under the lock).
	to=$2
	case $to in '' | *[!0-9]*) exit 2 ;; esac
	if [ "$to" = "$cur" ] || [ ! -L "$P-$to-link" ]; then
		echo "generation $to is not another generation of the system profile (current: $cur)" >&2
		exit 3
	fi
	say "previous $cur $(readlink -f "$P")"
	back_to "$to" "" switch
	;;
*)
	echo "clan-activate: unknown command $cmd" >&2
	exit 2
	;;
esac
