#!/usr/bin/env bash
# Install into .venv (first time) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
