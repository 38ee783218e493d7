#!/bin/sh
# buildctl v0.21.0 stand-in for the test image buildq/buildctl-standin:test (busybox sh, POSIX only).
#
# Imitates the common command line (global options, `build`/`b` with its flags, `--version`,
# `debug workers [-v]`) and the scenarios succeed / fail / hang / refused, read from
# `--opt build-arg:STANDIN_SCENARIO=<json>` or env STANDIN_SCENARIO (see tests/standin/README.md).
# Progress is a capture cat'ed from $STANDIN_CAPTURES (default /standin/captures), a flat folder
# holding the fixtures listed on the next line (.ci/dockerd.sh bakes them into the image):
# image-captures: builds/ctx_oci_rawjson_cold.stderr builds/ctx_oci_plain_cold.stderr errors/err_iii_sigterm_sigkill_plain.stderr errors/err_iv_syntax_plain.stderr errors/err_iv_syntax_rawjson.stderr version/buildctl_version.txt version/buildctl_help.txt version/buildctl_build_help.txt version/buildctl_debug_workers.txt

CAP=${STANDIN_CAPTURES:-/standin/captures}
ADDR=${BUILDKIT_HOST:-unix:///run/buildkit/buildkitd.sock}

err() { printf 'error: %s\n' "$1" >&2; exit "${2:-1}"; }
helpfile() { grep -v '^rc=' "$CAP/$1"; }

# usage_error <flag-error-text> <help file> <prefix>: urfave/cli prints usage on stdout.
usage_error() {
    printf '%s %s\n\n' "$3" "$1"
    helpfile "$2"
    err "$1"
}

flag_name() { n=${1#-}; n=${n#-}; printf '%s' "${n%%=*}"; }

# ---- global options (Go flag: stop at the first non-flag) ----
while [ $# -gt 0 ]; do
    case $1 in
        --) shift; break ;;
        -debug | --debug | -debug=* | --debug=* | -wait | --wait | -wait=* | --wait=*) shift ;;
        -addr=* | --addr=*) ADDR=${1#*=}; shift ;;
        -addr | --addr | -log-format | --log-format | -tlsservername | --tlsservername | \
            -tlscacert | --tlscacert | -tlscert | --tlscert | -tlskey | --tlskey | -tlsdir | --tlsdir | \
            -timeout | --timeout)
            [ $# -ge 2 ] || usage_error "flag needs an argument: -$(flag_name "$1")" buildctl_help.txt "Incorrect Usage."
            case $1 in -addr | --addr) ADDR=$2 ;; esac
            shift 2 ;;
        -log-format=* | --log-format=* | -tlsservername=* | --tlsservername=* | -tlscacert=* | --tlscacert=* | \
            -tlscert=* | --tlscert=* | -tlskey=* | --tlskey=* | -tlsdir=* | --tlsdir=* | -timeout=* | --timeout=*)
            shift ;;
        -h | --h | -help | --help) helpfile buildctl_help.txt; exit 0 ;;
        -v | --v | -version | --version) cat "$CAP/buildctl_version.txt"; exit 0 ;;
        -?*) usage_error "flag provided but not defined: -$(flag_name "$1")" buildctl_help.txt "Incorrect Usage." ;;
        *) break ;;
    esac
done

refused() {
    case $ADDR in
        unix://*) d="dial unix ${ADDR#unix://}: connect: no such file or directory" ;;
        *) d="dial tcp ${ADDR#*://}: connect: connection refused" ;;
    esac
    printf '%sfailed to list workers: Unavailable: connection error: desc = "transport: Error while dialing: %s"' "$1" "$d"
}

# json_get <key> <json>: the string or number value of "key" (first match; \" and \\ unescaped).
json_get() {
    printf '%s' "$2" | awk -v key="$1" '
    { s = s $0 "\n" }
    END {
        i = index(s, "\"" key "\"")
        if (i == 0) exit
        s = substr(s, i + length(key) + 2)
        sub(/^[ \t\n]*:[ \t\n]*/, "", s)
        if (substr(s, 1, 1) != "\"") { match(s, /^[-0-9.a-z]+/); print substr(s, 1, RLENGTH); exit }
        out = ""
        for (j = 2; j <= length(s); j++) {
            c = substr(s, j, 1)
            if (c == "\\") { j++; c = substr(s, j, 1); if (c == "n") c = "\n"; else if (c == "t") c = "\t" }
            else if (c == "\"") break
            out = out c
        }
        printf "%s", out
    }'
}

# csv_fields <value>: go-csvvalue fields, one per line; "ERR <text>" on a quoting error.
csv_fields() {
    printf '%s' "$1" | awk '
    function bad(msg) { print "ERR " msg; exit }
    { s = s $0 }
    END {
        n = length(s); i = 1; o = ""
        if (n == 0) bad("EOF")
        while (1) {
            if (substr(s, i, 1) != "\"") {
                j = index(substr(s, i), ","); f = (j ? substr(s, i, j - 1) : substr(s, i))
                q = index(f, "\"")
                if (q) bad("parse error on line 1, column " (i + q - 1) ": bare \" in non-quoted-field")
                o = o f "\n"
                if (!j) break
                i += j; continue
            }
            i++; f = ""
            while (1) {
                q = index(substr(s, i), "\"")
                if (!q) bad("parse error on line 1, column " i ": extraneous or missing \" in quoted-field")
                f = f substr(s, i, q - 1); i += q
                c = substr(s, i, 1)
                if (c == "\"") { f = f "\""; i++; continue }
                if (c == "" || c == ",") break
                bad("parse error on line 1, column " (i - 1) ": extraneous or missing \" in quoted-field")
            }
            o = o f "\n"
            if (c == "") break
            i++
        }
        printf "%s", o
    }'
}

# check_entry <flag> <value>: key=value CSV with a type= (buildctl's parse*CSV); for --output the
# name= values are appended to $NAMES_FILE.
check_entry() {
    fields=$(csv_fields "$2")
    case $fields in "ERR "*) err "${fields#ERR }" ;; esac
    has_type=
    while IFS= read -r f; do
        case $f in
            *=*) ;;
            *) err "invalid value $f" ;;
        esac
        case $f in
            [Tt][Yy][Pp][Ee]=?*) has_type=1 ;;
            [Nn][Aa][Mm][Ee]=*) [ "$1" != output ] || printf '%s\n' "${f#*=}" >>"$NAMES_FILE" ;;
        esac
    done <<EOF
$fields
EOF
    [ -n "$has_type" ] || err "--$1 requires type=<type>"
}

check_local() {
    case $1 in *=*) ;; *) err "invalid local: invalid value $1" ;; esac
    path=${1#*=}
    probe=
    set -f
    old_ifs=$IFS
    IFS=/
    for part in $path; do
        [ -n "$part" ] || continue
        if [ -z "$probe" ] && [ "${path#/}" = "$path" ]; then probe=$part; else probe=$probe/$part; fi
        [ -e "$probe" ] || [ -L "$probe" ] || err "invalid local: resolve : lstat $probe: no such file or directory"
    done
    IFS=$old_ifs
    set +f
    [ -d "$path" ] || err "invalid local: stat $path: not a directory"
}

write_metadata() {
    seed=$(printf '%s\n' "$1" | sha256sum | cut -c1-64)
    digest=sha256:$(printf '%s manifest' "$seed" | sha256sum | cut -c1-64)
    config=sha256:$(printf '%s config' "$seed" | sha256sum | cut -c1-64)
    cache=sha256:$(printf '%s cache' "$seed" | sha256sum | cut -c1-64)
    names=$(paste -s -d, "$NAMES_FILE")
    {
        printf '{\n'
        [ -z "$EXPORT_CACHE" ] || printf '  "cache.manifest": "{\\"mediaType\\":\\"application/vnd.oci.image.manifest.v1+json\\",\\"digest\\":\\"%s\\",\\"size\\":904}"%s\n' \
            "$cache" "$([ -n "$names" ] && echo ,)"
        if [ -n "$names" ]; then
            printf '  "containerimage.config.digest": "%s",\n' "$config"
            printf '  "containerimage.descriptor": {\n'
            printf '    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",\n'
            printf '    "digest": "%s",\n    "size": 696,\n' "$digest"
            printf '    "platform": {\n      "architecture": "amd64",\n      "os": "linux"\n    }\n  },\n'
            printf '  "containerimage.digest": "%s",\n' "$digest"
            printf '  "image.name": "%s"\n' "$names"
        fi
        printf '}'
    } >"$METADATA.tmp" && mv "$METADATA.tmp" "$METADATA"
}

cmd_build() {
    NAMES_FILE=$(mktemp)
    trap 'rm -f "$NAMES_FILE"' EXIT
    PROGRESS=auto METADATA= EXPORT_CACHE= FRONTEND= SCENARIO=${STANDIN_SCENARIO:-}
    ARGV="$*"
    while [ $# -gt 0 ]; do
        a=$1
        case $a in
            --) break ;;
            -no-cache | --no-cache | -no-cache=* | --no-cache=*) shift; continue ;;
            -h | --h | -help | --help) helpfile buildctl_build_help.txt; exit 0 ;;
            -?*) ;;
            *) shift; continue ;;
        esac
        name=$(flag_name "$a")
        case $name in
            o | output | progress | trace | local | oci-layout | frontend | opt | export-cache | import-cache | \
                secret | allow | ssh | metadata-file | source-policy-file | ref-file | registry-auth-tlscontext | \
                debug-json-cache-metrics) ;;
            *) usage_error "flag provided but not defined: -$name" buildctl_build_help.txt "Incorrect Usage:" ;;
        esac
        case $a in
            *=*) val=${a#*=}; shift ;;
            *)
                [ $# -ge 2 ] || usage_error "flag needs an argument: -$name" buildctl_build_help.txt "Incorrect Usage:"
                val=$2; shift 2 ;;
        esac
        case $name in
            o | output) check_entry output "$val" ;;
            export-cache) EXPORT_CACHE=1; case $val in *type=*) check_entry export-cache "$val" ;; esac ;;
            import-cache) case $val in *type=*) check_entry import-cache "$val" ;; esac ;;
            progress) PROGRESS=$val ;;
            frontend) FRONTEND=$val ;;
            metadata-file) METADATA=$val ;;
            local) check_local "$val" ;;
            opt)
                case $val in *=*) ;; *) err "invalid opt: invalid value $val" ;; esac
                case $val in build-arg:STANDIN_SCENARIO=*) SCENARIO=${val#build-arg:STANDIN_SCENARIO=} ;; esac ;;
        esac
    done
    case $PROGRESS in auto | tty | plain | rawjson | quiet | "") ;; *) err "invalid progress mode $PROGRESS" ;; esac
    [ -n "$FRONTEND" ] || err "please specify --frontend or pipe LLB definition to stdin"

    kind=$(json_get kind "$SCENARIO"); kind=${kind:-succeed}
    capture=$(json_get capture "$SCENARIO"); capture=${capture:-ctx_oci_rawjson_cold}
    if [ "$PROGRESS" = rawjson ]; then
        capture=$(printf '%s' "$capture" | sed 's/_plain_/_rawjson_/')
    else
        capture=$(printf '%s' "$capture" | sed 's/_rawjson_/_plain_/')
    fi
    file=$CAP/$capture.stderr
    [ -f "$file" ] || err "stand-in: capture $capture is not in the image" 2
    sleep_s=$(json_get sleep_s "$SCENARIO")
    after=$(json_get after_lines "$SCENARIO"); after=${after:-5}
    lines=$(grep -vc '^error: ' "$file")
    [ "$PROGRESS" != quiet ] || lines=0
    replay() { grep -v '^error: ' "$file" | sed -n "$1,$2p" >&2; }

    case $kind in
        succeed)
            half=$((lines / 2))
            [ "$half" -eq 0 ] || replay 1 "$half"
            [ -z "$sleep_s" ] || sleep "$sleep_s"
            [ "$lines" -le "$half" ] || replay $((half + 1)) "$lines"
            [ -z "$METADATA" ] || write_metadata "$ARGV"
            exit 0 ;;
        fail)
            [ "$lines" -eq 0 ] || [ "$after" -eq 0 ] || replay 1 "$after"
            [ -z "$sleep_s" ] || sleep "$sleep_s"
            ecap=$(json_get error_capture "$SCENARIO")
            if [ -n "$ecap" ]; then
                text=$(grep '^error: ' "$CAP/$ecap.stderr" | tail -n 1)
                text=${text#error: }
            else
                text=$(json_get error "$SCENARIO")
            fi
            rc=$(json_get rc "$SCENARIO")
            err "${text:-failed to solve: process \"/bin/sh -c exit 1\" did not complete successfully: exit code: 1}" "${rc:-1}" ;;
        hang)
            [ "$lines" -eq 0 ] || [ "$after" -eq 0 ] || replay 1 "$after"
            trap 'kill $! 2>/dev/null; err "failed to solve: Canceled: context canceled"' TERM INT
            while :; do
                sleep 3600 &
                wait $!
            done ;;
        refused) err "$(refused 'listing workers for Build: ')" ;;
        *) err "stand-in: unknown scenario kind $kind" 2 ;;
    esac
}

cmd_debug() {
    [ "$1" = workers ] || err "stand-in: only 'debug workers' is imitated" 2
    shift
    verbose=
    for a in "$@"; do
        case $a in
            -v | --v | -verbose | --verbose) verbose=1 ;;
            -f | --f | -filter | --filter | -format | --format | -h | --h | -help | --help) ;;
            -?*) usage_error "flag provided but not defined: -$(flag_name "$a")" buildctl_help.txt "Incorrect Usage:" ;;
        esac
    done
    case $(json_get kind "${STANDIN_SCENARIO:-}") in
        refused | fail) err "$(refused '')" ;;
    esac
    if [ -n "$verbose" ]; then
        cat "$CAP/buildctl_debug_workers.txt"
    else
        awk -F'\t' 'NR == 1 { id = $NF } NR == 2 { printf "ID\t\t\t\tPLATFORMS\n%s\t%s\n", id, $NF }' \
            "$CAP/buildctl_debug_workers.txt"
    fi
}

[ $# -gt 0 ] || { helpfile buildctl_help.txt; exit 0; }
cmd=$1
shift
case $cmd in
    build | b) cmd_build "$@" ;;
    debug) cmd_debug "$@" ;;
    help | h) helpfile buildctl_help.txt ;;
    du | prune | prune-histories | dial-stdio) err "stand-in: command '$cmd' is not imitated" 2 ;;
    *) echo "No help topic for '$cmd'" >&2; exit 3 ;;
esac
