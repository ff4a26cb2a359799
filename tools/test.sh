#!/usr/bin/env bash
# Set up .venv with the test extras if needed, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup_env.sh test
exec .venv/bin/python -m pytest "$@"
