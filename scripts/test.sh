#!/usr/bin/env bash
# Install into .venv (first time), install Orthanc (the PACS tests) and Chromium (the reading page's browser
# tests), run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh"
bash "$root/scripts/install-orthanc.sh"
bash "$root/scripts/install-browser.sh"
export MEDGEMMA_REQUIRE_ORTHANC=1  # the PACS tests fail, not skip, if Orthanc cannot run
export MEDGEMMA_REQUIRE_BROWSER=1  # the reading page's browser tests too, if Chromium is missing
cd "$root"
exec .venv/bin/python -m pytest "$@"
