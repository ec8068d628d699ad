#!/usr/bin/env bash
# A local Ray head on 127.0.0.1 with the dashboard (and so the Jobs API), to try `ray job submit`
# on one machine, and for the end-to-end tests.
#
#   cluster/local-head.sh start     # prints the address; writes $STATE/env for clients
#   source "$(cluster/local-head.sh env-file)"   # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python ray_jobs/nightly.py --config ...
#   cluster/local-head.sh stop      # stops this head only, not other Ray clusters on the machine
#   cluster/local-head.sh status
#
# Authentication (Ray 2.60 turns token auth on by default), set explicitly here:
#   RAY_LOCAL_AUTH=token (default): a fresh 256-bit token is generated into $STATE/auth_token
#     (mode 600) at each start; the head and every client read it through RAY_AUTH_TOKEN_PATH.
#   RAY_LOCAL_AUTH=disabled: no authentication. Only acceptable because everything binds to
#     127.0.0.1: any local user can then submit jobs. Never use it on a shared or open host.
#
# Settings (environment): RAY_LOCAL_STATE (default /tmp/merge-pipeline-ray-$UID; short, since
# Ray's socket paths are limited to ~100 characters), RAY_LOCAL_PORT (GCS, 6390),
# RAY_LOCAL_DASHBOARD_PORT (8265), RAY_LOCAL_CLIENT_PORT (Ray Client, 10001), RAY_LOCAL_CPUS (default: all), RAY (the ray executable).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${RAY_LOCAL_STATE:-/tmp/merge-pipeline-ray-$(id -u)}"
PORT="${RAY_LOCAL_PORT:-6390}"
DASHBOARD_PORT="${RAY_LOCAL_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_LOCAL_CLIENT_PORT:-10001}"
AUTH="${RAY_LOCAL_AUTH:-token}"
if [ -z "${RAY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/ray" ]; then RAY="$ROOT/.venv/bin/ray"; else RAY=ray; fi
fi
PYTHON="$(dirname "$(command -v "$RAY")")/python"
[ -x "$PYTHON" ] || PYTHON=python3

# PIDs of the processes of *this* head, and only those: the Ray processes that name its
# session directory (under our own temp dir), its Ray Client server (which names only the GCS
# port, and cannot be turned off), and everything they started.
own_pids() {
  ps -eo pid=,ppid=,args= | OWN="$STATE/ray" GCS=":$PORT " SELF="$$" awk '
    { pid[NR] = $1; parent[NR] = $2
      if (index($0, ENVIRON["OWN"]) ||
          (index($0, "ray.util.client.server") && index($0 " ", ENVIRON["GCS"]))) own[$1] = 1 }
    END {
      for (grew = 1; grew;) {
        grew = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in own) && (parent[i] in own)) { own[pid[i]] = 1; grew = 1 }
      }
      for (p in own) if (p != ENVIRON["SELF"]) print p
    }'
}

write_env() {
  {
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=$AUTH"
    if [ "$AUTH" = token ]; then echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"; fi
    echo "export MERGE_PIPELINE_RAY_GCS=127.0.0.1:$PORT"
  } > "$STATE/env.tmp"
  mv "$STATE/env.tmp" "$STATE/env"
}

wait_for_jobs_api() {
  # The dashboard answers a few seconds after `ray start` returns; ask the Jobs API itself.
  # shellcheck disable=SC1091
  ( source "$STATE/env"
    for _ in $(seq 1 120); do
      if "$PYTHON" - <<'EOF' 2>/dev/null; then exit 0; fi
import os
from ray.job_submission import JobSubmissionClient
JobSubmissionClient(os.environ["RAY_ADDRESS"]).list_jobs()
EOF
      sleep 0.5
    done
    exit 1 )
}

case "${1:-}" in
  start)
    if [ -n "$(own_pids)" ]; then
      echo "a head from $STATE is already running (cluster/local-head.sh stop first)" >&2
      exit 1
    fi
    case "$AUTH" in token|disabled) ;; *) echo "RAY_LOCAL_AUTH must be token or disabled" >&2; exit 2;; esac
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    rm -rf "$STATE/ray"
    if [ "$AUTH" = token ]; then
      (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32), end='')" \
        > "$STATE/auth_token")
      export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    fi
    export RAY_AUTH_MODE="$AUTH"
    cpus=()
    [ -n "${RAY_LOCAL_CPUS:-}" ] && cpus=(--num-cpus "$RAY_LOCAL_CPUS")
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --ray-client-server-port="$CLIENT_PORT" --temp-dir="$STATE/ray" --disable-usage-stats "${cpus[@]}" > "$STATE/start.log" 2>&1 || {
        cat "$STATE/start.log" >&2; exit 1; }
    write_env
    if ! wait_for_jobs_api; then
      echo "the Jobs API at http://127.0.0.1:$DASHBOARD_PORT did not answer in 60 s" >&2
      exit 1
    fi
    echo "Ray head on 127.0.0.1:$PORT, Jobs API http://127.0.0.1:$DASHBOARD_PORT (auth: $AUTH)"
    echo "client settings: source $STATE/env"
    ;;
  stop)
    pids="$(own_pids)"
    if [ -z "$pids" ]; then echo "no head from $STATE is running"; exit 0; fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(own_pids)" ] && break
      sleep 0.2
    done
    pids="$(own_pids)"
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    rm -f "$STATE/env" "$STATE/auth_token"
    echo "stopped the Ray head from $STATE"
    ;;
  status)
    if [ -n "$(own_pids)" ]; then echo "running ($(own_pids | wc -l) processes)"; else echo "stopped"; exit 3; fi
    ;;
  env-file)
    echo "$STATE/env"
    ;;
  *)
    echo "usage: $0 start|stop|status|env-file" >&2
    exit 2
    ;;
esac
