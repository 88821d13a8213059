#!/usr/bin/env bash
# The Bazel build of the C++ core: builds every target and runs every C++ test.
# Installs Bazel (Debian's bazel-bootstrap, 4.2.3) and libfabric from the package registry
# when missing; works offline otherwise. Bazel's state stays in build/bazel (ignored).
#   scripts/bazel_test.sh [extra bazel flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v bazel >/dev/null; then
  apt_install bazel-bootstrap
fi
if [ -z "${LIBFABRIC_ROOT:-}" ] && ! pkg-config --exists libfabric 2>/dev/null; then
  apt_install libfabric-dev pkg-config
fi

# The XLA FFI headers come from the jaxlib of this interpreter (the project's venv).
if [ -z "${PYTHON_BIN_PATH:-}" ]; then
  PYTHON_BIN_PATH=$PWD/.venv/bin/python
  if ! { [ -x "$PYTHON_BIN_PATH" ] && "$PYTHON_BIN_PATH" -c "import jax" 2>/dev/null; }; then
    [ -x "$PYTHON_BIN_PATH" ] || python3 -m venv .venv
    "$PYTHON_BIN_PATH" -m pip install -q jax jaxlib
  fi
fi

state=$PWD/build/bazel
bazel_() { bazel --output_user_root="$state/root" "$@"; }
# No Bazel server is left running after this script.
trap 'bazel_ shutdown 2>/dev/null || true' EXIT

common=(--repo_env=PYTHON_BIN_PATH="$PYTHON_BIN_PATH" --disk_cache="$state/cache" --color=no --curses=no)
start=$(date +%s)
bazel_ build "${common[@]}" "$@" //...
bazel_ test "${common[@]}" "$@" //...
echo "bazel_test.sh: built //... and passed the C++ tests in $(( $(date +%s) - start ))s"
