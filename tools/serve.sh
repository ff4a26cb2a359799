#!/usr/bin/env bash
# Set up .venv if needed, then serve the default model (or --model PATH). Extra arguments go to `kvloom serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup_env.sh
exec .venv/bin/kvloom serve "$@"
