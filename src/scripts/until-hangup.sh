# clan: runs "$@" until it ends or standard input does, whichever is first; exits with its
# status. How a stopped deploy ends remote builds and copies without a pseudo-terminal.
# A background job's input is /dev/null, so the session's input goes to the watcher as fd 3.
# The command leads a process group of its own (setsid), so the whole group is stopped
# (dash's kill takes -PGID, not --). The watcher lets go of the output, so the session ends
# with the command.
exec 3<&0
setsid "$@" </dev/null &
p=$!
{ cat <&3 >/dev/null; kill -TERM "-$p" 2>/dev/null; } >/dev/null 2>&1 &
exec 3<&-
wait "$p"
