#!/usr/bin/env bash
# Builds genkernels with its CUDA kernels compiled for CPU emulation, then runs the test suite.
set -euo pipefail
export GENKERNELS_EMULATION="${GENKERNELS_EMULATION:-ON}"
export GENKERNELS_WERROR="${GENKERNELS_WERROR:-ON}"
GK_EXTRA_PACKAGES="pytest pytest-benchmark scipy diffusers scikit-learn"
# shellcheck disable=SC1091
. "$(dirname "$0")/setup.sh"
python -m pytest tests benchmarks --benchmark-disable -q "$@"
