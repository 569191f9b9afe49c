#!/usr/bin/env bash
# Builds genkernels and runs its benchmark suite: every op beside its PyTorch reference.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "$0")/setup.sh"
python -m genkernels bench "$@"
