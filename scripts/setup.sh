#!/usr/bin/env bash
# Set up medsam2_jax for development and tests on a fresh machine (the README's set-up command).
#   - the package with its test extras (torch pinned to the CPU build, see pyproject.toml)
#   - the official SAM 2 code as the parity oracle, without its CUDA extension or torchvision
#   - the real medical images of shared/DATA.md, installed from Debian and PyPI packages
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q --upgrade "pip>=23" setuptools wheel
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# sam2==1.1.0 is Meta's release on PyPI; its build wants torch (already here) and CUDA (skipped).
SAM2_BUILD_CUDA=0 python -m pip install -q --no-deps --no-build-isolation "sam2==1.1.0"
if [ -f scripts/install_data.sh ]; then
  bash scripts/install_data.sh
fi
echo "medsam2_jax set up."
