#!/usr/bin/env bash
# Start / stop a local Ray head for the demo and the tests (dashboard + job server on 127.0.0.1).
#   cluster/local.sh start [TEMP_DIR]   # default TEMP_DIR: ./outputs/ray (absolute path is used)
#   cluster/local.sh stop [TEMP_DIR]    # only the head started with that TEMP_DIR (default as start)
#   cluster/local.sh stop --all         # every Ray of this user on the machine (ray stop --force)
#   cluster/local.sh status
# Environment: RAY (ray executable, default .venv/bin/ray), NUM_CPUS (default: all cores),
# RAY_PORT (GCS, default 6379), DASHBOARD_PORT (default 8265), AGENT_PORT (the head's dashboard agent,
# which runs submitted jobs; default 52365), CLIENT_PORT (the Ray client server, default 10001; not in
# 10002-19999, the workers' ports).
# `start` returns once the agent answers (at most 120 s):
# Ray's job server waits only 10 s for it, and on a busy machine it starts slower than that.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
# Jobs run `python` from the head's PATH: put the ray executable's environment first.
export PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
NUM_CPUS=${NUM_CPUS:-$(nproc)}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}
CLIENT_PORT=${CLIENT_PORT:-10001}  # the Ray client server's (ray://); another head on the machine needs another
# One auth mode for every process (Ray 2.60 writes ~/.ray/auth_token at the first ray.init()).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# Training workers at niceness 0 (Ray's default 15 lets Ray's daemons preempt them on small nodes).
export RAY_worker_niceness=${RAY_worker_niceness:-0}
case "${1:-}" in
  start)
    TEMP_DIR=$(realpath -m "${2:-outputs/ray}")
    mkdir -p "$TEMP_DIR"
    "$RAY" start --head --port="$RAY_PORT" --num-cpus="$NUM_CPUS" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --temp-dir="$TEMP_DIR" \
      --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" --disable-usage-stats
    echo "$RAY_PORT" > "$TEMP_DIR/local_head_port"  # for `stop`: the client server names only the GCS address
    # any HTTP answer (an unknown job's logs: 404) means the agent is up; a refused connection, not yet
    PY=$(dirname "$RAY")/python; [ -x "$PY" ] || PY=python3
    "$PY" - "$AGENT_PORT" <<'PY'
import sys, time, urllib.error, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/job_agent/jobs/none/logs"
for _ in range(240):
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"the Ray head's dashboard agent did not answer on port {sys.argv[1]} within 120 s")
PY
    echo "Ray head up: jobs at http://127.0.0.1:$DASHBOARD_PORT (ray job submit --address http://127.0.0.1:$DASHBOARD_PORT ...)"
    echo "to run ray_job.py commands on it from a shell: export RAY_ADDRESS=auto RAY_AUTH_MODE=$RAY_AUTH_MODE"
    ;;
  stop)
    if [ "${2:-}" = "--all" ]; then "$RAY" stop --force; exit 0; fi
    # the head's processes name its session folder under TEMP_DIR; the workers are their descendants
    TEMP_DIR=$(realpath -m "${2:-outputs/ray}")
    SESSION="$TEMP_DIR/session_"
    PIDS=$(pgrep -f -- "$SESSION" || true)
    if [ -f "$TEMP_DIR/local_head_port" ]; then
      PIDS="$PIDS $(pgrep -f -- "ray.util.client.server --address=[^ ]*:$(cat "$TEMP_DIR/local_head_port") " || true)"
    fi
    PIDS=$(echo $PIDS)
    if [ -z "$PIDS" ]; then echo "no Ray head of $(dirname "$SESSION") is running"; exit 0; fi
    ALL="" NEXT="$PIDS"
    while [ -n "$NEXT" ]; do
      ALL="$ALL $NEXT"
      NEXT=$(for p in $NEXT; do pgrep -P "$p" || true; done)
    done
    kill -TERM $ALL 2>/dev/null || true
    for _ in $(seq 20); do
      LEFT=$(for p in $ALL; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done)
      [ -z "$LEFT" ] && break
      sleep 0.5
    done
    [ -n "${LEFT:-}" ] && kill -KILL $LEFT 2>/dev/null || true
    echo "stopped the Ray head of $(dirname "$SESSION") ($(echo $ALL | wc -w) processes)"
    ;;
  status) "$RAY" status --address "127.0.0.1:$RAY_PORT" ;;
  *) echo "usage: $0 start [TEMP_DIR] | stop [TEMP_DIR | --all] | status" >&2; exit 2 ;;
esac
