#!/usr/bin/env bash
# CI: the README's first command on a fresh clone. The committed checkout is cloned into a temp dir, so
# `tools/serve.sh` there creates a new .venv without the test extras (no PyTorch); the server starts on a
# free port, must become ready, answer one chat completion with text, log no library noise at start,
# and exit 0 on SIGTERM. Prints how long each part took. Extra arguments go to `kvloom serve`.
#   tools/ci_serve_check.sh [--num-pages N ...]
# Bounds: KVLOOM_CHECK_READY_TIMEOUT (seconds, default 1800: installing counts too).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ready_timeout="${KVLOOM_CHECK_READY_TIMEOUT:-1800}"
work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "ci_serve_check: FAIL: $*" >&2; echo "--- server log (tail) ---" >&2; tail -n 40 "$work/serve.log" >&2; exit 1; }

t0=$(date +%s)
git clone --quiet "$repo" "$work/kvloom"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Nothing from this environment leaks in: no PYTHONPATH, no network for models, fresh kvloom caches.
(cd "$work/kvloom" && exec env -u PYTHONPATH -u VIRTUAL_ENV HF_HUB_OFFLINE=1 KVLOOM_CACHE_DIR="$work/cache" \
  tools/serve.sh --port "$port" --compile-cache "$work/jax" "$@") >"$work/serve.log" 2>&1 &
pid=$!

# Poll /ready (bounded); stop at once if the server process dies.
python3 - "$port" "$pid" "$ready_timeout" <<'EOF' || fail "not ready"
import os, sys, time, urllib.request
port, pid, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited before it was ready")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:  # not listening yet (installing), or 503 while warming up
        pass
    time.sleep(1)
sys.exit(f"/ready did not answer 200 within {timeout:.0f}s")
EOF
t_ready=$(date +%s)

python3 - "$port" <<'EOF' || fail "chat completion"
import json, sys, urllib.request
body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
        "temperature": 0}
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as r:
    answer = json.load(r)
text = answer["choices"][0]["message"]["content"]
if not isinstance(text, str) or not text.strip():
    sys.exit(f"empty answer: {answer}")
print(f"ci_serve_check: answer: {text.strip()!r}")
EOF
t_chat=$(date +%s)

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" -eq 0 ] || fail "the server exited with status $status after SIGTERM"
# Quiet start: no warnings from libraries about missing accelerators or frameworks, no tracebacks.
if grep -E -i "traceback|pytorch|tensorflow|\btpu\b|cuda" "$work/serve.log"; then
  fail "the server log has library noise or a traceback (lines above)"
fi
echo "ci_serve_check: OK: clone+install+start to /ready $((t_ready - t0))s, chat $((t_chat - t_ready))s," \
  "total $(( $(date +%s) - t0 ))s"
