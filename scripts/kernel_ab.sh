#!/usr/bin/env bash
# Kernel A/B: exports git revisions of this repository as source trees under .ab/, for
# `scripts/gpu_check.sh ab`, which builds each beside this tree's own and times them in turns
# on one GPU. Timings of one machine differ from another's by about a microsecond at decode
# sizes, more than many kernel changes gain: compare revisions on the same machine.
#
#   scripts/kernel_ab.sh NAME=REV [NAME=REV ...]    e.g. base=main arrivals=exp/decode-arrivals
#
# Then, with .ab carried to the GPU machine: scripts/gpu_check.sh build ab (AB_ROUNDS rounds,
# default 2); benchmarks/compare_kernels.py writes kernels_ab.md there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
rm -rf .ab
mkdir -p .ab
{
  echo "this $(git rev-parse HEAD)$(git diff --quiet HEAD || echo '+changes')"
  for spec in "$@"; do
    name=${spec%%=*} rev=${spec#*=}
    [[ $name =~ ^[A-Za-z0-9_-]+$ && $name != this && $name != "$spec" ]] || {
      echo "bad variant '$spec': NAME=REV, NAME of letters, digits, - and _, not 'this'" >&2
      exit 2
    }
    mkdir -p ".ab/$name"
    git archive "$rev" | tar -x -C ".ab/$name"
    echo "$name $(git rev-parse "$rev")"
  done
} >.ab/REVISIONS
cat .ab/REVISIONS
