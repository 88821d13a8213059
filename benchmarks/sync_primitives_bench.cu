// What the NVLink kernels' building blocks cost on this GPU, each alone: the launch of a full
// grid (2 blocks of kThreads per SM), a grid-wide handoff (the ready flag between the send and
// the recv half of a whole-op kernel) done with a block ticket as now or with per-block
// arrival counts, dependent loads from L2 and from HBM, a system-scope release, and the HBM
// bandwidth of a plain copy, of sequential stores, of the recv half's expansion (each 16-byte
// vector of a record loaded once and stored to k rows), and of the expansion turned around
// (blocks own output rows and gather records). It uses device_utils.cuh's own loads, stores
// and flags, so it times what the kernels run.
//
// Kernels are timed back to back in a CUDA graph (as XLA replays a command buffer): a graph of
// launches between two events, per launch. Each result is checked before it is timed.
//
//   sync_primitives_bench [--launches=200] [--repeats=7]       prints one JSON object
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cc/kernels/device_utils.cuh"

namespace {

using namespace jem;
using namespace jem::device;

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

void Require(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "check failed: %s\n", what.c_str());
    std::exit(1);
  }
}

__device__ __forceinline__ void AddReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void AddReleaseGpu(uint64_t* p, uint64_t v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

// How a block's waiting thread polls: an acquire load each time (as WaitFlag does now), or
// relaxed loads and one acquire fence once the value is there, at system or GPU scope.
enum class Poll { kAcquireSys, kRelaxedSys, kRelaxedGpu };

template <Poll kPoll>
__device__ __forceinline__ void Spin(const uint64_t* p, uint64_t target) {
  uint64_t v = 0;
  if constexpr (kPoll == Poll::kAcquireSys) {
    while (LoadAcquireSys(p) < target) __nanosleep(32);
  } else if constexpr (kPoll == Poll::kRelaxedSys) {
    do {
      asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    } while (v < target);
    asm volatile("fence.acq_rel.sys;" ::: "memory");
  } else {
    do {
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    } while (v < target);
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
  }
}

// Every word a handoff kernel uses, in device memory. A kernel's step is one past `step`,
// read at its start (so that a graph replays it) and advanced once every block has read it.
struct Words {
  uint64_t ticket, flag, count, step;
};

__device__ __forceinline__ uint64_t StepOf(const Words* w) {
  return *reinterpret_cast<const volatile uint64_t*>(&w->step) + 1;
}

__device__ __forceinline__ void EndStep(Words* w, uint64_t step) {
  if (blockIdx.x == 0 && threadIdx.x == 0) w->step = step;
}

__global__ void __launch_bounds__(kThreads, 2) Empty() {}

// The block ticket alone, as LastBlock takes it.
__global__ void __launch_bounds__(kThreads, 2) Ticket(Words* w) {
  __syncthreads();
  if (threadIdx.x == 0 && FetchAddAcqRelGpu(&w->ticket, 1) + 1 == gridDim.x) w->ticket = 0;
}

// As the whole-op kernels hand the send half to the recv half now: the last block to take the
// ticket raises the flag (system scope, for peers on other GPUs), every block waits for it.
template <Poll kPoll>
__global__ void __launch_bounds__(kThreads, 2) TicketHandoff(Words* w) {
  const uint64_t step = StepOf(w);
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    last = FetchAddAcqRelGpu(&w->ticket, 1) + 1 == gridDim.x;
    if (last) w->ticket = 0;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) StoreReleaseSys(&w->flag, step);
  if (threadIdx.x == 0) Spin<kPoll>(&w->flag, step);
  __syncthreads();
  EndStep(w, step);
}

// Per-block arrival counts instead: a step adds 2^32 in all (block 0 adds 2^32 - (grid - 1),
// the others 1), so the count reads step << 32 once every block of step `step` has arrived.
template <bool kSys, Poll kPoll>
__global__ void __launch_bounds__(kThreads, 2) ArrivalHandoff(Words* w) {
  const uint64_t step = StepOf(w);
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint64_t add = blockIdx.x == 0 ? (uint64_t{1} << 32) - (gridDim.x - 1) : 1;
    if constexpr (kSys) {
      AddReleaseSys(&w->count, add);
    } else {
      AddReleaseGpu(&w->count, add);
    }
    Spin<kPoll>(&w->count, step << 32);
  }
  __syncthreads();
  EndStep(w, step);
}

// One thread: `n` dependent loads around a random cycle (L1 bypassed), from where the last
// launch stopped, so that no launch finds the lines of the one before in L2.
__global__ void Chase(const uint32_t* next, int n, uint32_t* at) {
  uint32_t i = *at;
  for (int s = 0; s < n; ++s) i = __ldcg(next + i);
  *at = i;
}

// One thread: `n` system-scope release stores, each ordered after the last.
__global__ void Releases(uint64_t* word, int n) {
  for (int s = 1; s <= n; ++s) StoreReleaseSys(word, s);
}

__global__ void __launch_bounds__(kThreads, 2) Copy(const int4* from, int4* to, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    Store16(to + i, LoadInput16(from + i));
  }
}

__global__ void __launch_bounds__(kThreads, 2) Fill(int4* to, int64_t n) {
  const int4 v = make_int4(1, 2, 3, 4);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    Store16(to + i, v);
  }
}

// The recv half's expansion: blocks own contiguous record ranges, the rows of a piece's
// records go to shared memory first, each vector is loaded once and stored to its k rows.
// Store16, with the line first in line for eviction from L2.
__device__ __forceinline__ void Store16EvictFirst(void* p, int4 v, uint64_t policy) {
  asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.s32 [%0], {%1, %2, %3, %4}, %5;"
               :
               : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(policy)
               : "memory");
}

template <bool kEvictFirst>
__global__ void __launch_bounds__(kThreads, 2)
    Expand(const uint8_t* records, const int32_t* rows, uint8_t* out, int num_records, int k,
           int row_bytes) {
  uint64_t policy = 0;
  if constexpr (kEvictFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  }
  extern __shared__ int32_t s_rows[];  // [piece][k]
  const int piece = (num_records + gridDim.x - 1) / gridDim.x;
  const int r0 = Min(num_records, static_cast<int>(blockIdx.x) * piece);
  const int nrec = Min(num_records, r0 + piece) - r0;
  for (int x = threadIdx.x; x < nrec * k; x += kThreads) s_rows[x] = rows[r0 * k + x];
  __syncthreads();
  const int vecs = row_bytes / 16;
  Batched<4>(
      threadIdx.x, nrec * vecs,
      [&](int w) { return Load16(records + static_cast<int64_t>(r0) * row_bytes + w * 16); },
      [&](int w, int4 v) {
        const int r = w / vecs, c = w - r * vecs;
        for (int i = 0; i < k; ++i) {
          uint8_t* to = out + static_cast<int64_t>(s_rows[r * k + i]) * row_bytes + c * 16;
          if constexpr (kEvictFirst) {
            Store16EvictFirst(to, v, policy);
          } else {
            Store16(to, v);
          }
        }
      });
}

// The expansion turned around: blocks own contiguous output rows and load each row's record
// (src[row]), so the stores run in order.
__global__ void __launch_bounds__(kThreads, 2)
    Gather(const uint8_t* records, const int32_t* src, uint8_t* out, int num_rows, int row_bytes) {
  extern __shared__ int32_t s_src[];  // [rows of this block]
  const int vecs = row_bytes / 16;
  const int per_block = (num_rows + gridDim.x - 1) / gridDim.x;
  const int r0 = Min(num_rows, static_cast<int>(blockIdx.x) * per_block);
  const int n = Min(num_rows, r0 + per_block) - r0;
  for (int r = threadIdx.x; r < n; r += kThreads) s_src[r] = src[r0 + r];
  __syncthreads();
  Batched<4>(
      threadIdx.x, n * vecs,
      [&](int w) {
        const int r = w / vecs;
        return Load16(records + static_cast<int64_t>(s_src[r]) * row_bytes + (w - r * vecs) * 16);
      },
      [&](int w, int4 v) { Store16(out + static_cast<int64_t>(r0) * row_bytes + w * 16, v); });
}

int Flag(int argc, char** argv, const char* name, int fallback) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      return std::atoi(argv[i] + prefix.size());
    }
  }
  return fallback;
}

// Median over `repeats` replays of a CUDA graph of `launches` launches (as XLA's command
// buffers replay a step), µs per launch.
template <typename Launch>
double PerLaunchUs(Launch launch, int launches, int repeats) {
  cudaStream_t stream;
  Check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  Check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  for (int i = 0; i < launches; ++i) launch(stream);
  Check(cudaStreamEndCapture(stream, &graph), "capture");
  Check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  cudaEvent_t begin, end;
  Check(cudaEventCreate(&begin), "event");
  Check(cudaEventCreate(&end), "event");
  Check(cudaGraphLaunch(exec, stream), "warm up");
  std::vector<double> us;
  for (int r = 0; r < repeats; ++r) {
    Check(cudaEventRecord(begin, stream), "record");
    Check(cudaGraphLaunch(exec, stream), "graph");
    Check(cudaEventRecord(end, stream), "record");
    Check(cudaEventSynchronize(end), "sync");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, begin, end), "elapsed");
    us.push_back(1e3 * ms / launches);
  }
  Check(cudaGetLastError(), "launch");
  Check(cudaGraphExecDestroy(exec), "graph");
  Check(cudaGraphDestroy(graph), "graph");
  Check(cudaStreamDestroy(stream), "stream");
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// A random cycle through n slots: next[i] is where a chase at i goes.
std::vector<uint32_t> Cycle(uint32_t n, std::mt19937& rng) {
  std::vector<uint32_t> order(n), next(n);
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin() + 1, order.end(), rng);
  for (uint32_t i = 0; i < n; ++i) next[order[i]] = order[(i + 1) % n];
  return next;
}

}  // namespace

int main(int argc, char** argv) {
  const int launches = Flag(argc, argv, "launches", 200);
  const int repeats = Flag(argc, argv, "repeats", 7);
  int device = 0, sms = 0;
  Check(cudaGetDevice(&device), "device");
  Check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "sms");
  cudaDeviceProp prop;
  Check(cudaGetDeviceProperties(&prop, device), "properties");
  const int grid = 2 * sms;
  std::mt19937 rng(std::random_device{}());

  Words* w = nullptr;
  Check(cudaMalloc(&w, sizeof(Words)), "malloc");
  Words host{};
  const auto reset = [&] { Check(cudaMemset(w, 0, sizeof(Words)), "memset"); };
  const auto read_words = [&] {
    Check(cudaMemcpy(&host, w, sizeof(Words), cudaMemcpyDeviceToHost), "copy");
  };

  // Handoffs: each launch is one step; the words must show every step completed. A graph of
  // `launches` is replayed `repeats` times after one warm-up replay.
  const uint64_t steps = static_cast<uint64_t>(launches) * (repeats + 1);
  const double empty_us =
      PerLaunchUs([&](cudaStream_t s) { Empty<<<grid, kThreads, 0, s>>>(); }, launches, repeats);
  reset();
  const double ticket_us = PerLaunchUs(
      [&](cudaStream_t s) { Ticket<<<grid, kThreads, 0, s>>>(w); }, launches, repeats);
  read_words();
  Require(host.ticket == 0, "ticket reset by each kernel's last block");
  // Each handoff: the words must show every step completed.
  const auto handoff = [&](auto kernel, bool arrival, const char* what) {
    reset();
    const double us = PerLaunchUs(
        [&](cudaStream_t s) { kernel<<<grid, kThreads, 0, s>>>(w); }, launches, repeats);
    read_words();
    Require(host.step == steps && (arrival ? host.count == steps << 32 : host.flag == steps),
            what);
    return us;
  };
  const double ticket_acquire_us =
      handoff(TicketHandoff<Poll::kAcquireSys>, false, "ticket, acquire polls");
  const double ticket_relaxed_us =
      handoff(TicketHandoff<Poll::kRelaxedSys>, false, "ticket, relaxed polls");
  const double arrival_acquire_us =
      handoff(ArrivalHandoff<true, Poll::kAcquireSys>, true, "arrival, acquire polls");
  const double arrival_relaxed_us =
      handoff(ArrivalHandoff<true, Poll::kRelaxedSys>, true, "arrival, relaxed polls");
  const double arrival_gpu_us =
      handoff(ArrivalHandoff<false, Poll::kRelaxedGpu>, true, "arrival, GPU scope");

  // Latencies of one thread, less the launch of a 1-thread kernel.
  constexpr int kChase = 2000;
  uint32_t* at = nullptr;
  Check(cudaMalloc(&at, 4), "malloc");
  const double one_thread_us =
      PerLaunchUs([&](cudaStream_t s) { Empty<<<1, 1, 0, s>>>(); }, launches, repeats);
  const auto chase_ns = [&](uint32_t slots) {
    const std::vector<uint32_t> next = Cycle(slots, rng);
    uint32_t* d = nullptr;
    Check(cudaMalloc(&d, 4ull * slots), "malloc");
    Check(cudaMemcpy(d, next.data(), 4ull * slots, cudaMemcpyHostToDevice), "copy");
    Check(cudaMemset(at, 0, 4), "memset");
    Chase<<<1, 1>>>(d, kChase, at);
    uint32_t got = 0;
    Check(cudaMemcpy(&got, at, 4, cudaMemcpyDeviceToHost), "copy");
    uint32_t want = 0;
    for (int s = 0; s < kChase; ++s) want = next[want];
    Require(got == want, "pointer chase");
    const double us = PerLaunchUs(
        [&](cudaStream_t s) { Chase<<<1, 1, 0, s>>>(d, kChase, at); }, 10, repeats);
    Check(cudaFree(d), "free");
    return 1e3 * (us - one_thread_us) / kChase;
  };
  const double l2_ns = chase_ns(1u << 18);   // 1 MiB: in L2
  const double hbm_ns = chase_ns(1u << 26);  // 256 MiB: HBM (and TLB misses)
  constexpr int kReleases = 2000;
  const double release_ns =
      1e3 *
      (PerLaunchUs([&](cudaStream_t s) { Releases<<<1, 1, 0, s>>>(&w->flag, kReleases); }, 10,
                   repeats) -
       one_thread_us) /
      kReleases;

  // Bandwidth, at the sizes of a prefill step: T=4096 records of H=7168 fp8 bytes, top-8.
  constexpr int kRecords = 4096, kK = 8, kRowBytes = 7168, kRows = kRecords * kK;
  const int64_t rec_bytes = int64_t{kRecords} * kRowBytes, out_bytes = int64_t{kRows} * kRowBytes;
  uint8_t *records = nullptr, *out = nullptr, *copy_to = nullptr;
  int32_t *rows = nullptr, *src = nullptr;
  Check(cudaMalloc(&records, rec_bytes), "malloc");
  Check(cudaMalloc(&copy_to, rec_bytes), "malloc");
  Check(cudaMalloc(&out, out_bytes), "malloc");
  Check(cudaMalloc(&rows, 4 * kRows), "malloc");
  Check(cudaMalloc(&src, 4 * kRows), "malloc");
  std::vector<uint8_t> h_rec(rec_bytes);
  for (auto& b : h_rec) b = static_cast<uint8_t>(rng());
  Check(cudaMemcpy(records, h_rec.data(), rec_bytes, cudaMemcpyHostToDevice), "copy");
  // Each output row once, from a random record slot (as top-8 of many experts scatters them);
  // src is the inverse: the record of each row.
  std::vector<int32_t> h_rows(kRows), h_src(kRows);
  std::iota(h_rows.begin(), h_rows.end(), 0);
  std::shuffle(h_rows.begin(), h_rows.end(), rng);
  for (int x = 0; x < kRows; ++x) h_src[h_rows[x]] = x / kK;
  Check(cudaMemcpy(rows, h_rows.data(), 4 * kRows, cudaMemcpyHostToDevice), "copy");
  Check(cudaMemcpy(src, h_src.data(), 4 * kRows, cudaMemcpyHostToDevice), "copy");
  std::vector<uint8_t> h_out(out_bytes);
  const auto check_expanded = [&](const char* what) {
    Check(cudaMemcpy(h_out.data(), out, out_bytes, cudaMemcpyDeviceToHost), "copy");
    for (int x = 0; x < kRows; ++x) {
      Require(std::memcmp(h_out.data() + int64_t{h_rows[x]} * kRowBytes,
                          h_rec.data() + int64_t{x / kK} * kRowBytes, kRowBytes) == 0,
              what);
    }
    Check(cudaMemset(out, 0, out_bytes), "memset");
  };
  const int piece = (kRecords + grid - 1) / grid;
  const auto expand = [&](auto kernel, const char* what) {
    const auto launch = [&](cudaStream_t s) {
      kernel<<<grid, kThreads, piece * kK * 4, s>>>(records, rows, out, kRecords, kK, kRowBytes);
    };
    launch(0);
    check_expanded(what);
    return PerLaunchUs(launch, 10, repeats);
  };
  const double expand_us = expand(Expand<false>, "expanded rows");
  const double expand_evict_us = expand(Expand<true>, "expanded rows, evict first");
  const auto gather = [&](cudaStream_t s) {
    Gather<<<grid, kThreads, (kRows + grid - 1) / grid * 4, s>>>(records, src, out, kRows,
                                                              kRowBytes);
  };
  gather(0);
  check_expanded("gathered rows");
  const double gather_us = PerLaunchUs(gather, 10, repeats);
  const auto copy = [&](cudaStream_t s) {
    Copy<<<grid, kThreads, 0, s>>>(reinterpret_cast<const int4*>(records),
                                   reinterpret_cast<int4*>(copy_to), rec_bytes / 16);
  };
  copy(0);
  std::vector<uint8_t> h_copy(rec_bytes);
  Check(cudaMemcpy(h_copy.data(), copy_to, rec_bytes, cudaMemcpyDeviceToHost), "copy");
  Require(h_copy == h_rec, "copy");
  const double copy_us = PerLaunchUs(copy, 10, repeats);
  const double fill_us = PerLaunchUs(
      [&](cudaStream_t s) {
        Fill<<<grid, kThreads, 0, s>>>(reinterpret_cast<int4*>(out), out_bytes / 16);
      },
      10, repeats);
  Check(cudaMemcpy(h_out.data(), out, 64, cudaMemcpyDeviceToHost), "copy");
  Require(reinterpret_cast<const int32_t*>(h_out.data())[5] == 2, "fill");
  Check(cudaGetLastError(), "kernels");

  const auto tbps = [](double bytes, double us) { return bytes / us / 1e6; };
  std::printf(
      "{\"gpu\": \"%s\", \"sms\": %d, \"grid\": %d, \"threads\": %d, \"launches\": %d, "
      "\"repeats\": %d, \"empty_kernel_us\": %.3f, \"one_thread_kernel_us\": %.3f, "
      "\"ticket_kernel_us\": %.3f, \"ticket_handoff_acquire_polls_us\": %.3f, "
      "\"ticket_handoff_relaxed_polls_us\": %.3f, \"arrival_handoff_acquire_polls_us\": %.3f, "
      "\"arrival_handoff_relaxed_polls_us\": %.3f, \"arrival_handoff_gpu_us\": %.3f, "
      "\"l2_load_ns\": %.1f, \"hbm_load_ns\": %.1f, \"release_sys_ns\": %.1f, "
      "\"copy_bytes\": %lld, \"copy_us\": %.2f, \"copy_tb_s\": %.3f, "
      "\"fill_bytes\": %lld, \"fill_us\": %.2f, \"fill_tb_s\": %.3f, "
      "\"expand_read_bytes\": %lld, \"expand_write_bytes\": %lld, \"expand_us\": %.2f, "
      "\"expand_write_tb_s\": %.3f, \"expand_evict_first_us\": %.2f, "
      "\"expand_evict_first_write_tb_s\": %.3f, \"gather_us\": %.2f, \"gather_write_tb_s\": %.3f}\n",
      prop.name, sms, grid, kThreads, launches, repeats, empty_us, one_thread_us, ticket_us,
      ticket_acquire_us, ticket_relaxed_us, arrival_acquire_us, arrival_relaxed_us,
      arrival_gpu_us, l2_ns, hbm_ns, release_ns,
      static_cast<long long>(2 * rec_bytes), copy_us, tbps(2.0 * rec_bytes, copy_us),
      static_cast<long long>(out_bytes), fill_us, tbps(out_bytes, fill_us),
      static_cast<long long>(rec_bytes), static_cast<long long>(out_bytes), expand_us,
      tbps(out_bytes, expand_us), expand_evict_us, tbps(out_bytes, expand_evict_us), gather_us, tbps(out_bytes, gather_us));
  return 0;
}
