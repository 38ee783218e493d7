# buildq's buildctl runner: the entrypoint of every container the docker launcher starts (POSIX sh,
# busybox is enough). /buildq/run holds one folder per build, b/<run>/ (<run> = <job id>.<n>).
#
#   serve               Idle until stdin closes: the worker keeps stdin attached, so the container
#                       ends with the worker process. When /buildq/run/ctl is a FIFO (the folder is
#                       shared with the worker: the fast channel) it also serves the lines written to
#                       ctl: "run <run>" starts b/<run>/cmd (which exports the environment and sets
#                       the arguments) with stderr to the FIFO b/<run>/err and the exit status to
#                       b/<run>/rc (written before err closes: the worker reads it at end of file);
#                       "kill <run>" kills that build. Readiness: the token file is copied into the
#                       FIFO ready.
#   exec <run> <s> ARGS The exec channel: buildctl ARGS with stderr inherited; s=1: the secret files
#                       first come as a tar on stdin. Prints "rc <status>" and then the metadata
#                       file on stdout, and removes b/<run>.
#   kill <glob>         Kill the buildctl of every run matching <glob> (a job id followed by .*).
#   list                Print the run of every build whose buildctl is running (its pid file names a
#                       live process, no exit status yet), one a line: the reaper reads this, not ps.
R=/buildq/run
S=
! command -v setsid >/dev/null 2>&1 || S=setsid
launch() {
    d=$1
    shift
    $S buildctl "$@" </dev/null >/dev/null 3<&- &
    p=$!
    echo "$p" >"$d/pid"
    [ ! -e "$d/killed" ] || kill -9 -- "-$p" "$p" 2>/dev/null
    wait "$p" 2>/dev/null
}
stop() {
    for d in "$R"/b/$1; do
        [ -d "$d" ] || continue
        : >"$d/killed"
        [ ! -f "$d/pid" ] || [ -e "$d/rc" ] || { p=$(cat "$d/pid") && kill -9 -- "-$p" "$p"; } 2>/dev/null
    done
    return 0
}
case $1 in
serve)
    if [ -p "$R/ctl" ]; then
        exec 3<>"$R/ctl"
        while read -r op id <&3; do
            case $op in
            run) (
                exec 3<&- 2>"$R/b/$id/err"
                . "$R/b/$id/cmd"
                launch "$R/b/$id" "$@"
                echo $? >"$R/b/$id/rc"
            ) & ;;
            kill) stop "$id" ;;
            esac
        done &
        exec 3<&-
        cat "$R/token" >"$R/ready"
    fi
    while read -r _; do :; done
    ;;
exec)
    d=$R/b/$2
    mkdir -p "$d" || exit 125
    if [ "$3" = 1 ]; then (umask 077 && tar -x -f - -C "$d") || exit 125; fi
    shift 3
    launch "$d" "$@"
    rc=$?
    echo "rc $rc"
    cat "$d/metadata.json" 2>/dev/null
    rm -rf "$d"
    exit "$rc"
    ;;
kill) stop "$2" ;;
list)
    for d in "$R"/b/*; do
        [ -f "$d/pid" ] && [ ! -e "$d/rc" ] || continue
        s=$(sed 's/.*) //' "/proc/$(cat "$d/pid")/stat" 2>/dev/null | cut -c1)
        [ -z "$s" ] || [ "$s" = Z ] || echo "${d##*/}"
    done
    exit 0
    ;;
*) echo "buildq runner: unknown command $1" >&2; exit 2 ;;
esac
