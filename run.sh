#!/usr/bin/env bash
# The LLM gateway: ./run.sh [mitmproxy args]   ./run.sh test [--quick]   ./run.sh web [FILE]
#                  ./run.sh demo [web]   (a local fake provider and demo keys: no real keys needed)
#                  ./run.sh record FILE [mitmproxy args]   ./run.sh replay FILE...
#                  ./run.sh usage [--key NAME] [--since DATE]   (per-key table from the usage ledger)
#                  ./run.sh bench [--quick]   (benchmark against bare mitmdump: README "Benchmark")
# Environment: KEYS_FILE (keys.json), USAGE_DB (usage.sqlite3), GATEWAY_HOST (127.0.0.1),
#              GATEWAY_PORT (8080), WEB_PORT (8081),
#              GATEWAY_WORKERS (1; N or auto: N mitmdump workers behind HAProxy, docs/fleet.md),
#              GATEWAY_DRAIN_S (30), REDIS_URL (workers > 1: shared Redis; unset: a local redis-server;
#              one worker: limits in Redis when set), REDIS_PREFIX (llmgw:),
#              FLEET_DIR (.fleet: HAProxy config, fleet.json, local Redis data),
#              WEB_PASSWORD (mitmweb password; generated and printed once when unset),
#              METRICS_PORT (Prometheus /metrics on GATEWAY_HOST; unset: off), METRICS_TOKEN (bearer)
# Secrets stay out of argv (ps and /proc/PID/cmdline show it to every local user; mitmweb shows
# options): the gateway gets `--set usage_db=env:USAGE_DB --set redis_url=env:REDIS_URL` and reads
# the URLs (a password in them) from its environment, as it reads METRICS_TOKEN; so do the fleet's
# supervisor and workers (docs/hardening.md "Secrets").
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV="$ROOT/.venv"

find_python() {
    # mitmproxy 12 needs Python >= 3.12
    local candidates=("${PYTHON:-}" python3.13 python3.12 python3 python)
    local root
    for root in "$(pyenv root 2>/dev/null || true)" "$HOME/.pyenv"; do
        [ -n "$root" ] && candidates+=("$root"/versions/3.1[2-9]*/bin/python)
    done
    candidates+=(/usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9])
    local py
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
        if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    return 1
}

ensure_venv() {
    # ensure_venv: what the gateway needs (requirements.txt); ensure_venv dev: and the test suite's
    local files=(requirements.txt) stamp="$VENV/.requirements.sha256" want
    [ "${1:-}" = dev ] && files+=(requirements-dev.txt)
    want=$(cat "${files[@]}" | sha256sum | cut -c1-64)
    if [ -x "$VENV/bin/python" ] && grep -qx "$want" "$stamp" 2>/dev/null; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        if ! py=$(find_python); then
            echo "run.sh: no Python >= 3.12 found (mitmproxy 12 needs it)." >&2
            echo "        Install one (e.g. 'pyenv install 3.12' or your OS's python3.12 package) or set PYTHON=/path/to/python3.12." >&2
            exit 1
        fi
        echo "run.sh: creating .venv with $py ($("$py" --version 2>&1))" >&2
        "$py" -m venv "$VENV"
    fi
    echo "run.sh: installing ${files[*]} into .venv" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "${files[-1]}" >&2
    # one line per installed set (runtime, runtime+dev): either is current until a file changes
    { grep -v "^$want\$" "$stamp" 2>/dev/null | tail -n 3; echo "$want"; } > "$stamp.new" && mv "$stamp.new" "$stamp"
}

ensure_wrk() {
    # the benchmark's load generator (a Debian/Ubuntu package; not a Python dependency)
    command -v wrk >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing wrk (apt-get install wrk)" >&2
        apt-get install -y -q wrk >&2 || { apt-get update -q >&2 && apt-get install -y -q wrk >&2; } || true
    fi
    if ! command -v wrk >/dev/null 2>&1; then
        echo "run.sh: the benchmark needs wrk: 'sudo apt-get install wrk' (Debian/Ubuntu), 'brew install wrk' (macOS)" >&2
        exit 1
    fi
}

check_keys() {
    "$VENV/bin/python" -m addon.policy.keys "$KEYS_FILE" || exit 1
}

reject_script_options() {
    # mitmproxy refuses a script option given twice and then drops the whole gateway script
    # (every request would get a 502): these come from the environment only
    local arg
    for arg in "$@"; do
        case "$arg" in
            keys_file=*|usage_db=*|record_file=*|redis_url=*|redis_prefix=*|metrics_*=*)
                echo "run.sh: set ${arg%%=*} through the environment (KEYS_FILE, USAGE_DB, REDIS_URL, REDIS_PREFIX, METRICS_PORT, METRICS_TOKEN) or the subcommand, not --set" >&2
                exit 2 ;;
        esac
    done
}

quiet_flows() {
    # mitmdump's per-flow lines give way to the gateway's access lines, unless the user chose a
    # flow_detail (mitmproxy refuses an option given twice)
    local arg
    QUIET=(--set flow_detail=0)
    for arg in "$@"; do
        case "$arg" in flow_detail=*) QUIET=() ;; esac
    done
}

KEYS_FILE=${KEYS_FILE:-keys.json}
export USAGE_DB=${USAGE_DB-usage.sqlite3}  # set but empty: no ledger. Read from the environment (env:)
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
WEB_PORT=${WEB_PORT:-8081}
GATEWAY_ARGS=(--set connection_strategy=lazy
              --set "keys_file=$KEYS_FILE"
              --set usage_db=env:USAGE_DB
              --set "redis_prefix=${REDIS_PREFIX:-llmgw:}"
              -s "$ROOT/addon/gateway.py")
if [ -n "${METRICS_PORT:-}" ]; then
    # the token comes from the environment (METRICS_TOKEN), never argv: ps and mitmweb show options
    GATEWAY_ARGS+=(--set "metrics_port=$METRICS_PORT" --set "metrics_host=$GATEWAY_HOST")
fi
# one process with REDIS_URL (e.g. one per Kubernetes pod): its limits live in that Redis
# (with GATEWAY_WORKERS > 1 the supervisor passes it to every worker, the same way)
REDIS_ARGS=()
if [ -n "${REDIS_URL:-}" ]; then
    export REDIS_URL
    REDIS_ARGS=(--set redis_url=env:REDIS_URL)
fi
# one process drains at SIGTERM/Ctrl-C itself (addon/hooks/drain.py); a fleet's supervisor drains HAProxy first
PROXY_ARGS=(--mode "reverse:http://127.0.0.1:1@${GATEWAY_HOST}:${GATEWAY_PORT}" "${GATEWAY_ARGS[@]}" "${REDIS_ARGS[@]}"
            --set "drain_s=${GATEWAY_DRAIN_S:-30}")

gateway_workers() {
    # GATEWAY_WORKERS: a positive number, or auto (one per core)
    local n=${GATEWAY_WORKERS:-1}
    [ "$n" = auto ] && n=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
    if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
        echo "run.sh: GATEWAY_WORKERS=$GATEWAY_WORKERS: give a number of workers (1 or more) or auto" >&2
        exit 2
    fi
    echo "$n"
}

ensure_fleet_tools() {
    # GATEWAY_WORKERS > 1: HAProxy balances the workers; a local redis-server unless REDIS_URL is given
    local need=(haproxy) missing=() tool
    [ -z "${REDIS_URL:-}" ] && need+=(redis-server)
    for tool in "${need[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing ${missing[*]} (apt-get install ${missing[*]})" >&2
        apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; } || true
        missing=()
        for tool in "${need[@]}"; do
            command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
        done
        [ ${#missing[@]} -eq 0 ] && return 0
    fi
    echo "run.sh: GATEWAY_WORKERS > 1 needs ${missing[*]}: 'sudo apt-get install ${missing[*]}' (Debian/Ubuntu; or ./run.sh setup as root)" >&2
    return 1
}

run_fleet() {
    # N mitmdump workers on loopback ports behind HAProxy on GATEWAY_HOST:GATEWAY_PORT (docs/fleet.md)
    local workers=$1; shift
    if [ -n "${METRICS_PORT:-}" ] && [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
        # every worker keeps its numbers here and serves METRICS_PORT; a scrape sums them all
        # (docs/metrics.md). It must start empty, and private: the files hold key names, tokens, cost
        export PROMETHEUS_MULTIPROC_DIR="${FLEET_DIR:-$ROOT/.fleet}/metrics"
        rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$(dirname "$PROMETHEUS_MULTIPROC_DIR")" && mkdir -m 700 "$PROMETHEUS_MULTIPROC_DIR"
    fi
    exec "$VENV/bin/python" -m fleet.supervisor --workers "$workers" --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" \
        --drain-s "${GATEWAY_DRAIN_S:-30}" --state-dir "${FLEET_DIR:-$ROOT/.fleet}" \
        --mitmdump "$VENV/bin/mitmdump" -- "${GATEWAY_ARGS[@]}" "$@"
}

cmd=${1:-}
case "$cmd" in
    test)
        shift
        ensure_venv dev
        "$VENV/bin/ruff" check --quiet . || { echo "run.sh: ruff check found the problems above (ruff.toml)" >&2; exit 1; }
        if [ "${1:-}" = --quick ]; then
            # the unit layer (tests/unit/: no gateway, fleet, service, browser or npm client started;
            # tests/e2e/ is not even imported), property tests drawing a fifth of their examples
            # (tests/conftest.py: examples). Later pytest args still apply (a path, -k, another -m)
            shift
            GATEWAY_TEST_QUICK=1 exec "$VENV/bin/python" -m pytest --ignore=tests/e2e \
                -m "not e2e and not fleet and not browser and not client" "$@"
        fi
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    web)
        shift
        ensure_venv
        if [ -z "${WEB_PASSWORD:-}" ]; then
            WEB_PASSWORD=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')
            echo "run.sh: mitmweb password (printed once): $WEB_PASSWORD" >&2
        fi
        # mitmweb shows its options to the (logged-in) user and ps shows argv: pass a hash
        web_hash=$(printf %s "$WEB_PASSWORD" | "$VENV/bin/python" -c 'import argon2, sys; print(argon2.PasswordHasher().hash(sys.stdin.read()))')
        # view_filter: in-flight flows (their request still carries the real key) are not listed
        web_args=(--set web_host=127.0.0.1 --set "web_port=$WEB_PORT" --set web_open_browser=false
                  --set "web_password=$web_hash" --set 'view_filter=~s | ~e' --set replayable_flows=true
                  --set web_columns=index --set web_columns=method --set web_columns=path
                  --set web_columns=status --set web_columns=size --set web_columns=time
                  --set web_columns=comment)  # a list option: one --set per column
        if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
            # ./run.sh web FILE: offline inspection, no listener; Replay re-routes through the
            # gateway addon (KEYS_FILE), so a recorded flow never goes out with REDACTED.
            # Loading a file runs the response hooks: a throwaway usage ledger keeps the
            # recorded flows from being counted again in USAGE_DB
            file=$1; shift
            ledger=$(mktemp -d)
            exec "$VENV/bin/mitmweb" -n -r "$file" --set "keys_file=$KEYS_FILE" --set "usage_db=$ledger/usage.sqlite3" \
                -s "$ROOT/addon/gateway.py" "${web_args[@]}" "$@"
        fi
        reject_script_options "$@"
        check_keys
        exec "$VENV/bin/mitmweb" "${PROXY_ARGS[@]}" "${web_args[@]}" "$@"
        ;;
    record)
        shift
        [ $# -gt 0 ] || { echo "usage: ./run.sh record FILE [mitmproxy args]" >&2; exit 2; }
        file=$1; shift
        ensure_venv
        reject_script_options "$@"
        check_keys
        quiet_flows "$@"
        exec "$VENV/bin/mitmdump" "${PROXY_ARGS[@]}" "${QUIET[@]}" --set "record_file=$file" "$@"
        ;;
    replay)
        shift
        [ $# -gt 0 ] || { echo "usage: ./run.sh replay FILE" >&2; exit 2; }
        ensure_venv
        exec "$VENV/bin/python" -m addon.recording.replay --keys "$KEYS_FILE" "$@"
        ;;
    usage)
        shift
        ensure_venv
        exec "$VENV/bin/python" -m addon.usage.ledger --db env:USAGE_DB "$@"
        ;;
    demo)
        shift
        ensure_venv
        exec "$VENV/bin/python" -m demo "$@"
        ;;
    setup)
        ensure_venv
        # GATEWAY_WORKERS=N ./run.sh setup: also HAProxy and redis-server (installed as root, else how)
        if [ "$(gateway_workers)" -gt 1 ]; then ensure_fleet_tools || true; fi
        ;;
    bench)
        shift
        ensure_venv
        ensure_wrk
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    *)
        workers=$(gateway_workers)
        ensure_venv
        reject_script_options "$@"
        check_keys
        quiet_flows "$@"
        if [ -n "${METRICS_PORT:-}" ]; then
            echo "run.sh: metrics at http://$GATEWAY_HOST:$METRICS_PORT/metrics${METRICS_TOKEN:+ (bearer token: METRICS_TOKEN)}" >&2
        fi
        if [ "$workers" -gt 1 ]; then
            ensure_fleet_tools || exit 1
            run_fleet "$workers" "${QUIET[@]}" "$@"
        fi
        exec "$VENV/bin/mitmdump" "${PROXY_ARGS[@]}" "${QUIET[@]}" "$@"
        ;;
esac
