# clan: a machine's health check, within a time limit. Arguments: SECONDS CHECK.
# Its output goes to a file of its own while it runs, then to the workstation: a process
# the check leaves behind (started with setsid, a daemon) keeps what it inherited open, and
# the ssh session would wait for it long after the limit. Exit: the check's, 124 when it
# did not finish in time.
o=$(mktemp) || exit 1
timeout "$1" sh -c "$2" </dev/null >"$o" 2>&1
s=$?
cat "$o"
rm -f "$o"
exit $s
