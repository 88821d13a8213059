// The signal path of the GPU fabric path, timed: one GPU thread publishes a step number in
// mapped pinned host memory (as the send kernels publish to the mailbox), a poll hook on a
// TransferEngine's proxy thread sees it and raises a flag in mapped host memory (as
// FabricProxy releases a receiving kernel), and the GPU thread spins on that flag. The GPU
// times each round trip with %globaltimer; one way is half of it (the host and GPU clocks
// are not comparable to a microsecond). A plain CPU thread doing the same is the floor.
//
//   proxy_signal_bench [--provider=shm] [--iters=20000]      prints one JSON object
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "cc/transfer_engine/api.h"

namespace {

void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

__device__ uint64_t GlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ping <- i, wait pong == i; rtt[i] in ns. Gives up (rtt = ~0) after a second per step.
__global__ void PingPong(uint64_t* ping, const uint64_t* pong, uint64_t* rtt, int iters) {
  for (int i = 1; i <= iters; ++i) {
    const uint64_t t0 = GlobalTimer();
    asm volatile("st.release.sys.global.u64 [%0], %1;" : : "l"(ping), "l"(uint64_t(i)) : "memory");
    uint64_t v = 0, t1 = t0;
    do {
      asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(pong) : "memory");
      t1 = GlobalTimer();
    } while (v != uint64_t(i) && t1 - t0 < 1000000000ull);
    rtt[i - 1] = v == uint64_t(i) ? t1 - t0 : ~0ull;
  }
}

struct Stats {
  double p50_us, p99_us;
  int lost;
};

Stats Summarize(std::vector<uint64_t> ns) {
  const int lost = static_cast<int>(std::count(ns.begin(), ns.end(), ~0ull));
  ns.erase(ns.begin(), ns.begin() + ns.size() / 10);  // warm-up
  std::sort(ns.begin(), ns.end());
  return {ns[ns.size() / 2] / 1e3, ns[ns.size() * 99 / 100] / 1e3, lost};
}

// Runs the kernel against `responder` (which answers ping with pong) and returns the rtts.
template <typename Start, typename Stop>
std::vector<uint64_t> Run(uint64_t* words, int iters, Start start, Stop stop) {
  words[0] = words[1] = 0;
  uint64_t* rtt = nullptr;
  Check(cudaMalloc(&rtt, iters * sizeof(uint64_t)), "cudaMalloc");
  uint64_t* mapped = nullptr;
  Check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped), words, 0),
        "cudaHostGetDevicePointer");
  start();
  PingPong<<<1, 1>>>(mapped, mapped + 1, rtt, iters);
  Check(cudaGetLastError(), "launch");
  Check(cudaDeviceSynchronize(), "kernel");
  stop();
  std::vector<uint64_t> out(iters);
  Check(cudaMemcpy(out.data(), rtt, iters * sizeof(uint64_t), cudaMemcpyDeviceToHost), "copy");
  cudaFree(rtt);
  return out;
}

// The responder's body: answers every new ping.
bool Answer(uint64_t* words, uint64_t* seen) {
  const uint64_t v = __atomic_load_n(&words[0], __ATOMIC_ACQUIRE);
  if (v == *seen) return false;
  *seen = v;
  __atomic_store_n(&words[1], v, __ATOMIC_RELEASE);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string provider = "shm";
  int iters = 20000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--provider=", 0) == 0) provider = a.substr(11);
    if (a.rfind("--iters=", 0) == 0) iters = std::atoi(a.c_str() + 8);
  }
  uint64_t* words = nullptr;
  Check(cudaHostAlloc(reinterpret_cast<void**>(&words), 256, cudaHostAllocMapped),
        "cudaHostAlloc");

  // Floor: a plain CPU thread spinning on the word.
  std::atomic<bool> done{false};
  std::thread thread;
  uint64_t seen_bare = 0;
  const Stats bare = Summarize(Run(
      words, iters,
      [&] {
        thread = std::thread([&] {
          while (!done.load(std::memory_order_relaxed)) Answer(words, &seen_bare);
        });
      },
      [&] {
        done = true;
        thread.join();
      }));

  // The engine's proxy thread, through a poll hook, as FabricProxy runs.
  jem::EngineOptions options;
  options.provider = provider;
  auto engine = jem::TransferEngine::Create(options);
  uint64_t seen_hook = 0;
  uint64_t hook = 0;
  const Stats proxy = Summarize(Run(
      words, iters,
      [&] { hook = engine->AddPollHook([&] { return Answer(words, &seen_hook); }); },
      [&] { engine->RemovePollHook(hook); }));

  std::printf(
      "{\"provider\": \"%s\", \"iters\": %d, "
      "\"bare_rtt_p50_us\": %.3f, \"bare_rtt_p99_us\": %.3f, \"bare_lost\": %d, "
      "\"proxy_rtt_p50_us\": %.3f, \"proxy_rtt_p99_us\": %.3f, \"proxy_lost\": %d}\n",
      provider.c_str(), iters, bare.p50_us, bare.p99_us, bare.lost, proxy.p50_us, proxy.p99_us,
      proxy.lost);
  cudaFreeHost(words);
  return bare.lost + proxy.lost > 0 ? 2 : 0;
}
