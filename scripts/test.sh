#!/usr/bin/env bash
# Install everything, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest tests "$@"
