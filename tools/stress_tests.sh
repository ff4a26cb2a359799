#!/usr/bin/env bash
# Run the router tests N times serially and N times under `pytest -n 2`; print the pass count of each.
#   tools/stress_tests.sh N [pytest args]     (default tests: tests/api/test_router_*.py tests/engine/test_kv_events.py)
# Each run is one pytest session; a run passes when pytest exits 0. Logs of failed runs stay in $STRESS_LOGS
# (default: a fresh temporary directory), so a flake can be read afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:?usage: tools/stress_tests.sh N [pytest args]}"
shift
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(tests/api/test_router_routing.py tests/api/test_router_index.py tests/api/test_router_failover.py
          tests/api/test_router_e2e.py tests/engine/test_kv_events.py)
fi
logs="${STRESS_LOGS:-$(mktemp -d -t kvloom-stress.XXXXXX)}"
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run_series() {  # name, extra pytest flags...
    local name="$1" passed=0 i
    shift
    for ((i = 1; i <= runs; i++)); do
        if .venv/bin/python -m pytest -q -p no:cacheprovider "$@" "${args[@]}" >"$logs/$name-$i.log" 2>&1; then
            passed=$((passed + 1))
            rm -f "$logs/$name-$i.log"
        else
            echo "$name run $i failed: $logs/$name-$i.log" >&2
        fi
        echo "$name: run $i/$runs, $passed passed" >&2
    done
    echo "$name: $passed/$runs passed"
}

run_series serial
run_series xdist-n2 -n 2
