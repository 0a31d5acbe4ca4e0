#!/usr/bin/env bash
# Install into .venv (first time), then start a real MONAI Label server with the embedded phantom model
# (a synthetic TEST model, not MedGemma) and ask it about phantoms and real chest X-rays.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh"
cd "$root"
exec .venv/bin/python sample-apps/demo/demo.py "$@"
