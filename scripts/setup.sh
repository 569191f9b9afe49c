# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv if needed, installs the
# runtime and build requirements, and builds and installs genkernels into it.
#
#   GENKERNELS_TORCH      torch requirement (default torch==2.13.0; use your CUDA build's version)
#   GENKERNELS_CUDA       AUTO (default: build the CUDA module when nvcc is found), ON or OFF
#   GENKERNELS_EMULATION  ON to also build the CUDA kernels for CPU emulation (the tests do)
#   GK_EXTRA_PACKAGES     further packages to install (the tests' requirements)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
python -m pip install -q "${GENKERNELS_TORCH:-torch==2.13.0}" numpy scikit-build-core pybind11 ninja ${GK_EXTRA_PACKAGES:-}
python -m pip install -q --no-build-isolation .
