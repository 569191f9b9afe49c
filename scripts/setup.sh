# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv if needed, installs the
# runtime and build requirements, and builds and installs genkernels into it.
#
#   GENKERNELS_TORCH      torch requirement (default torch==2.13.0; use your CUDA build's version),
#                         or "system": keep the torch (and every other package) of the python3
#                         that creates .venv, whose site-packages then join the environment's path
#   GENKERNELS_WHEELS     a folder of wheels: packages come only from it, never from an index (for
#                         machines with no network; with GENKERNELS_TORCH=system, only what the
#                         outer python3 lacks needs a wheel)
#   GENKERNELS_CUDA       AUTO (default: build the CUDA module when nvcc is found), ON or OFF
#   GENKERNELS_EMULATION  ON to also build the CUDA kernels for CPU emulation (the tests do)
#   GK_EXTRA_PACKAGES     further packages to install (the tests' requirements)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
torch_requirement="${GENKERNELS_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  if [ "$torch_requirement" = system ]; then
    # pip too comes from the outer site-packages (no ensurepip needed).
    python3 -m venv --without-pip .venv
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
      >"$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer-site-packages.pth"
  else
    python3 -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_source=()
if [ -n "${GENKERNELS_WHEELS:-}" ]; then
  pip_source=(--no-index --find-links "$GENKERNELS_WHEELS")
else
  python -m pip install -q --upgrade pip
fi
[ "$torch_requirement" = system ] && torch_requirement=
# shellcheck disable=SC2086
python -m pip install -q "${pip_source[@]}" $torch_requirement numpy scikit-build-core pybind11 ninja ${GK_EXTRA_PACKAGES:-}
python -m pip install -q "${pip_source[@]}" --no-build-isolation .
