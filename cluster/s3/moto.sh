#!/usr/bin/env bash
# A local S3 endpoint (moto server) on 127.0.0.1 for tests.
#
#   cluster/s3/moto.sh start [PORT]    # default port 5555; waits until it answers HTTP
#   cluster/s3/moto.sh stop [PORT]
#   cluster/s3/moto.sh status [PORT]   # exit 0 when it answers
#
# Interpreter: $PYTHON, else <repo>/.venv/bin/python, else python3 (needs moto[server]).
# pid and log files: ${PIXPRO_MOTO_DIR:-/tmp/pixpro-moto}/moto-PORT.{pid,log}. Idempotent.
# Clients: endpoint_url=http://127.0.0.1:PORT, any key/secret (e.g. AWS_ACCESS_KEY_ID=testing).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status [PORT]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
CMD=$1
PORT=${2:-5555}
[[ $PORT =~ ^[0-9]+$ ]] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE_DIR=${PIXPRO_MOTO_DIR:-/tmp/pixpro-moto}
PID_FILE=$STATE_DIR/moto-$PORT.pid
LOG_FILE=$STATE_DIR/moto-$PORT.log
URL=http://127.0.0.1:$PORT
WAIT_S=${PIXPRO_MOTO_WAIT_S:-30}

pick_python() {
    if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"
    elif [[ -x $REPO/.venv/bin/python ]]; then echo "$REPO/.venv/bin/python"
    else command -v python3
    fi
}

running_pid() {  # prints the pid when the pid file names a live moto server
    local pid
    [[ -s $PID_FILE ]] || return 1
    pid=$(<"$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "moto.server" || return 1
    echo "$pid"
}

answers() {  # any HTTP answer counts (moto returns 200 on / with the bucket list)
    local py
    py=$(pick_python)
    "$py" - "$URL" <<'EOF' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=1)
except urllib.error.HTTPError:
    pass
EOF
}

case "$CMD" in
start)
    mkdir -p "$STATE_DIR"
    if pid=$(running_pid); then
        if answers; then echo "moto: already running at $URL (pid $pid)"; exit 0; fi
    elif answers; then
        echo "moto: ERROR: something else already answers on $URL (no pid file $PID_FILE)" >&2
        exit 1
    else
        py=$(pick_python)
        "$py" -c "import moto.server" 2>/dev/null \
            || { echo "moto: ERROR: $py cannot import moto.server (pip install 'moto[server]')" >&2; exit 1; }
        # setsid + nohup: the server survives the shell (and CI step) that started it.
        setsid nohup "$py" -m moto.server -H 127.0.0.1 -p "$PORT" >"$LOG_FILE" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$PID_FILE"
    fi
    deadline=$((SECONDS + WAIT_S))
    until answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "moto: ERROR: server exited; tail of $LOG_FILE:" >&2; tail -n 20 "$LOG_FILE" >&2
            rm -f "$PID_FILE"; exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "moto: ERROR: no answer on $URL after ${WAIT_S}s; tail of $LOG_FILE:" >&2
            tail -n 20 "$LOG_FILE" >&2; exit 1
        fi
        sleep 0.1
    done
    echo "moto: running at $URL (pid $pid, log $LOG_FILE)"
    ;;
stop)
    if pid=$(running_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        echo "moto: stopped (pid $pid)"
    else
        echo "moto: not running on port $PORT"
    fi
    rm -f "$PID_FILE"
    ;;
status)
    if pid=$(running_pid) && answers; then echo "moto: running at $URL (pid $pid)"; exit 0; fi
    echo "moto: not running on port $PORT"; exit 1
    ;;
*) usage ;;
esac
