#!/usr/bin/env bash
# The accelerator benchmark (tools/accel_bench.py): a Qwen3-0.6B-shaped random checkpoint, the engine
# and scoring benchmarks in bfloat16 and float32, a summary under $OUT (else a temporary directory).
#   tools/accel_bench.sh [--tiny] [--dtypes bfloat16,float32] [--out DIR] ...   (--help lists them)
# Python: $KVLOOM_PYTHON (a prepared virtual environment's python), else .venv/bin/python, set up by
# tools/setup_env.sh when missing. Where nvidia-smi exists and JAX sees no GPU, jax[cuda12] of the
# installed JAX version is installed into that environment first (from PyPI); --tiny installs nothing
# and runs where JAX runs (JAX_PLATFORMS=cpu forces the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${KVLOOM_PYTHON:-.venv/bin/python}"
if [ -z "${KVLOOM_PYTHON:-}" ] && [ ! -x "$py" ]; then
  tools/setup_env.sh
fi
tiny=0
for arg in "$@"; do
  if [ "$arg" = "--tiny" ]; then tiny=1; fi
done
sees_gpu() { "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }
if [ "$tiny" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && ! sees_gpu; then
  version="$("$py" -c 'import jax; print(jax.__version__)')"
  echo "accel_bench: nvidia-smi finds a GPU and JAX does not: installing jax[cuda12]==$version" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "jax[cuda12]==$version"
  sees_gpu || { echo "accel_bench: JAX still sees no GPU after installing jax[cuda12]" >&2; exit 2; }
fi
# This checkout's kvloom, whatever the environment has installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m kvloom.tools.accel_bench "$@"
