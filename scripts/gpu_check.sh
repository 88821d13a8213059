#!/usr/bin/env bash
# Build, test and benchmark the CUDA (NVLink) path on a machine with 2 NVIDIA GPUs, in one go.
#
#   scripts/gpu_check.sh [stage ...]     stages, run in the order given: info build kernels
#                                        sanitizer kbench profile pytest fabric signal bench (default:
#                                        all but profile, in that order; kbench times the
#                                        kernels alone, profile runs them under ncu with one
#                                        rank, fabric runs the fabric-path tests twice: staged
#                                        through pinned host memory on the system libfabric, and
#                                        with GPU memory registered (FI_HMEM) on a libfabric
#                                        built with CUDA in .deps/libfabric-cuda; bench runs
#                                        benchmarks/bench_all_to_all.py against the stock paths;
#                                        fabric_bench, not by default, times ours through the
#                                        proxy between 2 GPUs, one process each; decode, not by
#                                        default, times one rank with and without command
#                                        buffers; primitives, not by default, times the
#                                        kernels' building blocks alone; ab, not by default,
#                                        times the revisions scripts/kernel_ab.sh exported
#                                        against this tree's kernels; overlap, not by
#                                        default, puts the matmul
#                                        on a second stream; training times one MoE layer's
#                                        backward; post times the engine posting to 1..63
#                                        peers)
#
# DEADLINE_S (seconds from the start) cuts the stages short, so that the archive is still made.
# Logs and results go to $OUT (default build/gpu_check), packed at the end into
# gpu_check.tar.gz beside summary.txt. Needs nvcc, cmake, ninja and a
# python3 with jax for CUDA, nanobind, scikit-build-core and pytest. libfabric: pkg-config,
# or LIBFABRIC_ROOT, or headers unpacked from Debian's libfabric-dev into .deps/libfabric
# (`apt-get download libfabric-dev && dpkg -x libfabric-dev_*.deb x`, then copy x/usr/include
# to .deps/libfabric/include) next to a libfabric.so.1 runtime the loader knows.
#
# The extension is built with CMake into build/gpu and copied into jax_efa_moe/, so that the
# tests and the processes they launch import this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STAGES=${*:-info build kernels sanitizer kbench pytest fabric signal bench}
CUDA_FABRIC=$PWD/.deps/libfabric-cuda/lib
# NVLink multicast stays off, for every program started from here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=$OUT/summary.txt
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
FAILED=0

stage() {  # stage NAME LOG TIMEOUT_S command...
  local name=$1 log=$OUT/$2 limit=$3
  shift 3
  # DEADLINE_S bounds the whole run, so that it ends (and packs its logs) before the caller's
  # own limit.
  local left=$((${DEADLINE_S:-86400} - SECONDS))
  if [ $left -lt 10 ]; then
    echo "=== $name: skipped, DEADLINE_S reached" | tee -a "$log" "$SUMMARY"
    FAILED=1
    return 1
  fi
  [ "$limit" -le $left ] || limit=$left
  local t0=$SECONDS
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$log" "$SUMMARY"
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

fabric_root() {
  pkg-config --exists libfabric 2>/dev/null && return 0
  if [ -z "${LIBFABRIC_ROOT:-}" ]; then
    for d in .deps/libfabric ../.deps/libfabric; do
      [ -f "$d/include/rdma/fabric.h" ] && LIBFABRIC_ROOT=$(cd "$d" && pwd) && break
    done
  fi
  [ -n "${LIBFABRIC_ROOT:-}" ] || { echo "no libfabric headers found" >&2; return 1; }
  if ! ls "$LIBFABRIC_ROOT"/lib*/libfabric.so* >/dev/null 2>&1; then
    # Headers only: pair them with the runtime library in a scratch prefix.
    local runtime
    runtime=$(ldconfig -p | awk '/libfabric\.so\.1 /{print $NF; exit}')
    [ -n "$runtime" ] || { echo "no libfabric.so.1 runtime found" >&2; return 1; }
    local prefix=/tmp/jem_libfabric
    mkdir -p "$prefix/lib"
    ln -sfn "$LIBFABRIC_ROOT/include" "$prefix/include"
    ln -sf "$runtime" "$prefix/lib/libfabric.so"
    LIBFABRIC_ROOT=$prefix
  fi
  export LIBFABRIC_ROOT
}

build() {
  fabric_root || return 1
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$PY")" || return 1
  ninja -C build/gpu _jem nvlink_context_test proxy_signal_bench sync_primitives_bench || return 1
  cp build/gpu/_jem*.so jax_efa_moe/ || return 1
  "$PY" -c "from jax_efa_moe import _jem; assert _jem.has_cuda; print('GPUs:', _jem.cuda_device_count())"
}

kernels_two_processes() {  # nvlink_context_test as 2 processes over CUDA IPC; $1 = wrapper
  local dir
  dir=$(mktemp -d)
  local pids=()
  # Each rank under its own deadline, so that a hung rank's log still gets printed.
  for r in 0 1; do
    timeout --kill-after=5 "${RANK_TIMEOUT_S:-80}" $1 build/gpu/nvlink_context_test \
      --rank $r --world 2 --rendezvous "$dir" ${2:-} >"$dir/rank$r.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for r in 0 1; do echo "--- rank $r"; cat "$dir/rank$r.log"; done
  rm -rf "$dir"
  return $rc
}

profile() {  # ncu on one rank's kernels (one rank: ncu serializes launches)
  # PROFILE_CASES: nvlink_context_test --profile cases, ';' between them; PROFILE_SECTIONS:
  # ncu --section names (default: the full set).
  local case rep n=0 sections=(--set full) cubins obj kind
  cubins=$(mktemp -d)
  [ -n "${PROFILE_SECTIONS:-}" ] && sections=($(printf -- '--section %s ' $PROFILE_SECTIONS))
  while IFS= read -r case; do
    n=$((n + 1))
    rep=$OUT/kernels_r1_case$n
    echo "case $n: $case"
    ncu --clock-control none "${sections[@]}" --import-source yes -f -o "$rep" \
      -k regex:"${PROFILE_KERNELS:-Dispatch|Combine}" --launch-skip 8 --launch-count 4 \
      build/gpu/nvlink_context_test --world 1 --profile "$case" || return 1
    ncu -i "$rep.ncu-rep" --page details --print-details all >"$rep.details.txt" || return 1
    ncu -i "$rep.ncu-rep" --page raw --csv >"$rep.raw.csv" || return 1
    # Per-instruction stall samples, where this ncu can print them, and the same per source
    # line (scripts/ncu_lines.py, on the cubins of this build).
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.sass.csv" 2>&1 ||
      ncu -i "$rep.ncu-rep" --page source --csv >"$rep.sass.csv" 2>&1 || true
    for kind in dispatch combine; do  # best effort: nothing else depends on it
      obj=$PWD/build/gpu/CMakeFiles/jem_cuda.dir/cc/kernels/${kind}_kernels.cu.o
      (cd "$cubins" && cuobjdump -xelf all "$obj" >/dev/null) &&
        "$PY" scripts/ncu_lines.py --csv="$rep.sass.csv" \
          --cubin="$cubins/${kind}_kernels.sm_90a.cubin" --kernel="${kind^}" \
          >>"$rep.lines.txt" 2>&1 || true
    done
  done < <(tr ';' '\n' <<<"${PROFILE_CASES:-T=128}")
}

ab() {  # this tree's kernels and each variant's in .ab/ (scripts/kernel_ab.sh): each built and
  # tested (one process), then timed in turns
  fabric_root || return 1
  local names=(this) dirs=(.) d i r
  for d in .ab/*/; do
    [ -d "$d" ] || continue
    names+=("$(basename "$d")")
    dirs+=("${d%/}")
  done
  for i in "${!names[@]}"; do
    cmake -S "${dirs[$i]}" -B "build/ab/${names[$i]}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null || return 1
    ninja -C "build/ab/${names[$i]}" nvlink_context_test >/dev/null || return 1
    echo "--- ${names[$i]}: the kernel tests, one process"
    "build/ab/${names[$i]}/nvlink_context_test" || return 1
  done
  for r in $(seq "${AB_ROUNDS:-2}"); do
    for i in "${!names[@]}"; do
      echo "--- round $r, ${names[$i]}"
      "build/ab/${names[$i]}/nvlink_context_test" --world 1 \
        --bench "$OUT/ab_${names[$i]}_round$r.json" || return 1
    done
  done
  "$PY" benchmarks/compare_kernels.py --revisions=.ab/REVISIONS --out="$OUT" \
    "$OUT"/ab_*_round*.json
}

sanitize() {  # compute-sanitizer TOOL on the small cases: one process, then one per rank
  local tool="compute-sanitizer --tool $1 --error-exitcode 9 --print-limit 20"
  $tool build/gpu/nvlink_context_test --small || return 1
  kernels_two_processes "$tool" --small
}

export -f fabric_root build kernels_two_processes sanitize profile ab
export PY OUT

for s in $STAGES; do
  case $s in
    info)
      stage info info.log 60 eval 'nvidia-smi; nvidia-smi topo -m; nvcc --version;
        "$PY" -c "import jax; print(jax.__version__, jax.devices())";
        ldconfig -p | grep libfabric; if [ -x .deps/libfabric-cuda/bin/fi_info ]; then
        .deps/libfabric-cuda/bin/fi_info --version && .deps/libfabric-cuda/bin/fi_info -p shm -c FI_HMEM; fi' ;;
    build)
      stage build build.log 300 build ;;
    kernels)
      stage "kernels, one process" kernels.log 90 build/gpu/nvlink_context_test
      stage "kernels, two processes (IPC)" kernels.log 120 kernels_two_processes "" ;;
    pytest)
      stage pytest pytest.log "${PYTEST_TIMEOUT_S:-300}" "$PY" -m pytest -q -x -rA tests/test_gpu.py ${PYTEST_ARGS:-} ;;
    fabric)
      stage "fabric, system libfabric (staged)" fabric.log "${FABRIC_TIMEOUT_S:-420}" env \
        JEM_FABRIC_STAGING=host "$PY" -m pytest -q -rA tests/test_gpu.py \
        -k "${FABRIC_TESTS:-fabric or hybrid}"
      # libfabric loads the CUDA runtime itself: JAX's, from its wheel.
      cudart=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))")
      # On one shared GPU, shm's cudaMemcpy waits behind the other ranks' spinning kernels
      # and a jitted loop of steps stalls (README): only with a GPU per rank.
      [ -d "$CUDA_FABRIC" ] && [ "$GPUS" -ge 2 ] && stage "fabric, libfabric with CUDA (FI_HMEM)" fabric.log \
        "${FABRIC_TIMEOUT_S:-420}" env LD_LIBRARY_PATH="$CUDA_FABRIC:$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        JEM_FABRIC_STAGING=device "$PY" -m pytest -q -rA tests/test_gpu.py \
        -k "${FABRIC_HMEM_TESTS:-fabric_every_routing and shm or hybrid}" ;;
    primitives)
      stage "building blocks" bench.log 180 "$PY" benchmarks/bench_primitives.py --out="$OUT" ;;
    signal)
      stage "signal latency" bench.log 120 "$PY" benchmarks/bench_signal.py --out="$OUT" ;;
    sanitizer)
      limit=${SANITIZER_TIMEOUT_S:-240}
      RANK_TIMEOUT_S=$((limit * 5 / 8)) stage memcheck sanitizer.log "$limit" sanitize memcheck
      RANK_TIMEOUT_S=$((limit * 5 / 8)) stage racecheck sanitizer.log "$limit" sanitize racecheck ;;
    ab)  # scripts/kernel_ab.sh NAME=REV ... first, here; .ab carried
      stage "kernel A/B" bench.log "${AB_TIMEOUT_S:-500}" ab ;;
    kbench)
      # Two ranks on one GPU would time-slice it: their timings would mean nothing.
      [ "$GPUS" -ge 2 ] && stage "kernel benchmark" bench.log 180 "$PY" benchmarks/bench_kernels.py \
        --world=2 --out_dir="$OUT"
      stage "kernel benchmark, one rank" bench.log 180 "$PY" benchmarks/bench_kernels.py \
        --world=1 --out_dir="$OUT" ;;
    profile)
      stage profile profile.log 300 profile ;;
    fabric_bench)
      stage "bench_all_to_all, fabric path" bench.log "${BENCH_TIMEOUT_S:-500}" "$PY" \
        benchmarks/bench_all_to_all.py --platform=cuda --processes=2 --ranks_per_node=1 \
        --impls=ours --overlap=false --name=a2a_fabric_cuda --out="$OUT" ${BENCH_ARGS:-} ;;
    decode)  # one rank, no peer: the fixed cost of a step, with and without command buffers,
      # in a while loop and unrolled (DECODE_LOOPS, DECODE_DTYPES, DECODE_CMDBUF pick); traced,
      # so that the device's own time per step stands beside the wall clock's
      for loop in ${DECODE_LOOPS:-while unrolled}; do
        for dt in ${DECODE_DTYPES:-fp8 bf16}; do
          for cb in ${DECODE_CMDBUF:-on off}; do
            flags=$([ $cb = off ] && echo --xla_gpu_enable_command_buffer=)
            suffix=$([ $loop = unrolled ] && echo _unrolled)
            stage "decode $dt, command buffers $cb, $loop" bench.log 150 env XLA_FLAGS="$flags" \
              "$PY" benchmarks/bench_all_to_all.py --platform=cuda --processes=1 --impls=ours \
              --tokens=128,4096 --dispatch_dtype=$dt --overlap=false --repeats=10 --trace \
              --unroll=$([ $loop = unrolled ] && echo true || echo false) \
              --note="Command buffers $cb: run with XLA_FLAGS='$flags'." \
              --name=a2a_cuda_ep1_${dt}_cmdbuf_$cb$suffix --out="$OUT" ${BENCH_ARGS:-}
          done
        done
      done ;;
    overlap)  # one rank: send, a matmul on a second XLA stream, recv; with and without a budget
      stage "overlap, matmul on a second stream" bench.log "${BENCH_TIMEOUT_S:-300}" "$PY" \
        benchmarks/bench_all_to_all.py --platform=cuda --processes=1 --impls=ours \
        --tokens=128,4096 --max_sms=none,32 --matmul_stream=1 --repeats=10 \
        --name=a2a_cuda_ep1_overlap --out="$OUT" ${BENCH_ARGS:-} ;;
    post)  # CPU processes only: posting one dispatch step's writes for 1 to 63 peers
      stage "posting cost" bench.log 150 "$PY" benchmarks/bench_post.py --out_dir="$OUT" \
        --name=post_gpu_machine ;;
    training)
      stage "training benchmark" bench.log 150 "$PY" benchmarks/bench_all_to_all.py \
        --platform=cuda --training --impls=ragged,ours --name=training_cuda --out="$OUT" ;;
    bench)
      stage bench_all_to_all bench.log "${BENCH_TIMEOUT_S:-500}" "$PY" \
        benchmarks/bench_all_to_all.py --platform=cuda --out="$OUT" --plot ${BENCH_ARGS:-} ;;
    *) echo "unknown stage $s (info build kernels sanitizer kbench profile pytest fabric signal" \
         "bench fabric_bench decode primitives ab overlap training post)" >&2; exit 2 ;;
  esac
done
echo "--- summary"
cat "$SUMMARY"
# The device tool returns at most 8 files from $OUT: logs and results travel as one archive.
(cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name gpu_check.tar.gz \
  -printf '%P\n' | tar czf gpu_check.tar.gz -T - --remove-files)
exit $FAILED
