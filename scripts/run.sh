#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine, then run the example or the tests.
#   scripts/run.sh example [flags...]   the MoE example (CPU processes, or GPUs where present)
#   scripts/run.sh test [pytest args]   the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# libfabric with headers, fi_pingpong (benchmarks) and pkg-config.
if [ -z "${LIBFABRIC_ROOT:-}" ] && ! { pkg-config --exists libfabric 2>/dev/null && command -v fi_pingpong >/dev/null; }; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfabric-dev libfabric-bin pkg-config >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q jax jaxlib numpy absl-py pytest nanobind "scikit-build-core>=0.10" cmake ninja
python -m pip install -q --no-build-isolation --no-deps -e .

# Tests and the example talk only over loopback.
export FI_TCP_IFACE=${FI_TCP_IFACE:-lo}

what=${1:-test}
shift || true
case "$what" in
  example) exec python examples/moe_inference.py "$@" ;;
  test) exec python -m pytest -q tests "$@" ;;
  *) echo "usage: scripts/run.sh example|test [args...]" >&2; exit 2 ;;
esac
