#!/usr/bin/env bash
# Install into .venv (first time), install Orthanc (the PACS tests need it), run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh"
bash "$root/scripts/install-orthanc.sh"
export MEDGEMMA_REQUIRE_ORTHANC=1  # the PACS tests fail, not skip, if Orthanc cannot run
cd "$root"
exec .venv/bin/python -m pytest "$@"
