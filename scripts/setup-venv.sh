#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install the project with its test tools.
# torch and torchvision come first, pinned, from this machine's local wheels: left to the resolver,
# monailabel would pull another torchvision and with it a multi-GB CUDA torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16)"
pip_install() {  # quiet, without this machine's "Location ... is ignored" index noise
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
if [ ! -f "$stamp" ]; then
  echo "installing into .venv (first time: several minutes) ..."
  pip_install --upgrade pip
  pip_install torch==2.14.1 torchvision==0.29.1
  pip_install -e ".[test,ray]"  # ray: the batch job's Ray engine is tested too
  .venv/bin/python -c "import torch, transformers, monailabel, monailabel_app" # fail here, not in the tests
  rm -f .venv/.installed-*
  touch "$stamp"
fi
