// Standalone test and benchmark of the NVLink kernels, without XLA: random routings checked
// bit for bit against an independent host reference, error cases, and per-phase timings.
//
//   nvlink_context_test                        every rank in this process, GPU r = rank r
//   nvlink_context_test --rank r --world n --rendezvous DIR
//                                              one rank per process (CUDA IPC), handles
//                                              exchanged as files in DIR; rank r on GPU
//                                              r mod the GPUs visible (they may share one)
//   nvlink_context_test --small                only the small cases (for compute-sanitizer)
//
// The cases run with every SM and again under small SM budgets (max_sms 1, 3, 7: grids of that
// many blocks, each taking its work in several pieces), with staged sends, direct sends and
// whole ops.
//   nvlink_context_test --bench OUT.json       timings at T=128 and T=4096, the variants
//                                              that break T=128 down, and where the time of
//                                              a step goes, phase by phase (one process)
//   nvlink_context_test --profile NAME         a few steps of one benchmark configuration,
//                                              nothing held back: for ncu
//   --world N (without --rank)                 N ranks in this process (default: 2 GPUs)
// The cases include steps replayed from CUDA graphs (as XLA's command buffers replay them)
// and the halves called out of order.
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cc/a2a/nvlink_context.h"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

#define CHECK_CUDA(x)                                                                 \
  do {                                                                                \
    cudaError_t err_ = (x);                                                           \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x,                 \
                   cudaGetErrorString(err_));                                         \
      std::exit(2);                                                                   \
    }                                                                                 \
  } while (0)

int g_failures = 0;

#define EXPECT(cond, ...)                          \
  do {                                             \
    if (!(cond)) {                                 \
      ++g_failures;                                \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);           \
      std::fprintf(stderr, "\n");                  \
    }                                              \
  } while (0)

uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float FromBf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- cases

enum class Routing { kUniform, kZipf, kOneExpert, kOneRank, kWithUnused };

struct Case {
  std::string name;
  int R = 2, E = 16, k = 4, H = 256, T = 32;
  int dispatch_bytes = 2, combine_bytes = 2;
  int align = 1;
  int max_recv = 0;  // 0: the default
  Routing routing = Routing::kUniform;
  int num_tokens = -1;  // -1: T
  int steps = 3;
  bool expect_capacity_error = false;
  int bad_expert_rank = -1;  // this rank puts an out-of-range id in token 0
  int max_sms = 0;  // SM budget of the kernels (0: every SM)

  Layout MakeLayout() const {
    Layout l;
    l.num_ranks = R;
    l.num_experts = E;
    l.experts_per_token = k;
    l.hidden = H;
    l.max_tokens = T;
    l.expert_alignment = align;
    l.dispatch_elem_bytes = dispatch_bytes;
    l.combine_elem_bytes = combine_bytes;
    l.has_scales = dispatch_bytes == 1;
    l.max_recv_tokens =
        max_recv > 0 ? max_recv : Layout::DefaultMaxRecvTokens(R, E, k, T, align);
    return l;
  }
};

// One rank's inputs of one step, identical in every process (seeded by case, step, rank).
struct RankInput {
  int num_tokens = 0;
  std::vector<uint8_t> x;         // [T, H * dispatch_bytes]
  std::vector<float> x_scale;     // [T, S]
  std::vector<int32_t> ids;       // [T, k]
  std::vector<float> weights;     // [T, k]
  std::vector<uint8_t> y;         // [M, H * combine_bytes], the expert outputs of this rank
};

RankInput MakeInput(const Case& c, const Layout& l, int step, int rank) {
  std::mt19937_64 rng(1000003ull * step + 7919ull * rank + std::hash<std::string>()(c.name));
  RankInput in;
  const int T = c.T, k = c.k, E = c.E;
  in.num_tokens = c.num_tokens >= 0 ? c.num_tokens : T;
  in.x.resize(static_cast<size_t>(T) * l.x_bytes());
  for (auto& b : in.x) b = static_cast<uint8_t>(rng());
  in.x_scale.resize(static_cast<size_t>(T) * l.num_scales());
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (auto& s : in.x_scale) s = unit(rng);
  in.ids.assign(static_cast<size_t>(T) * k, -1);
  in.weights.resize(static_cast<size_t>(T) * k);
  for (auto& w : in.weights) w = unit(rng);
  const int L = E / c.R;
  std::vector<double> zipf(E);
  for (int e = 0; e < E; ++e) zipf[e] = 1.0 / (e + 1);
  std::discrete_distribution<int> zipf_pick(zipf.begin(), zipf.end());
  for (int t = 0; t < T; ++t) {
    std::vector<int> chosen;
    auto pick = [&]() -> int {
      switch (c.routing) {
        case Routing::kZipf: return zipf_pick(rng);
        case Routing::kOneExpert: return 3 % E;
        case Routing::kOneRank: return static_cast<int>(rng() % L);  // rank 0's experts
        default: return static_cast<int>(rng() % E);
      }
    };
    for (int i = 0; i < k; ++i) {
      int e = pick();
      // distinct experts per token where possible (the router's top-k), except kOneExpert
      for (int tries = 0; c.routing != Routing::kOneExpert && tries < 64 &&
                          std::find(chosen.begin(), chosen.end(), e) != chosen.end();
           ++tries) {
        e = pick();
      }
      chosen.push_back(e);
      in.ids[t * k + i] = e;
      if (c.routing == Routing::kWithUnused && rng() % 3 == 0) in.ids[t * k + i] = -1;
    }
  }
  if (c.bad_expert_rank == rank) in.ids[0] = E + 5;
  in.y.resize(static_cast<size_t>(l.max_recv_tokens) * l.hidden * l.combine_elem_bytes);
  if (l.combine_elem_bytes == 2) {
    auto* p = reinterpret_cast<uint16_t*>(in.y.data());
    for (size_t i = 0; i < in.y.size() / 2; ++i) p[i] = ToBf16(unit(rng));
  } else {
    auto* p = reinterpret_cast<float*>(in.y.data());
    for (size_t i = 0; i < in.y.size() / 4; ++i) p[i] = unit(rng);
  }
  return in;
}

// ---------------------------------------------------------------- reference

struct Expected {
  // sender side
  std::vector<int32_t> send_tokens, send_index;
  // receiver side
  std::vector<uint8_t> expert_x;
  std::vector<float> expert_x_scale;
  std::vector<int32_t> expert_counts, group_sizes, recv_tokens, record_rows, home_offsets;
  std::vector<float> record_weights;
  std::vector<uint8_t> out;  // combine result
  int64_t rows_needed = 0, records_needed = 0;
};

// Every rank's expectation from every rank's inputs, straight from the README's definitions.
std::vector<Expected> Reference(const Layout& l, const std::vector<RankInput>& in) {
  const int R = l.num_ranks, k = l.experts_per_token, T = l.max_tokens;
  const int64_t L = l.local_experts(), M = l.max_recv_tokens, N = l.max_recv_records();
  const int64_t xb = l.x_bytes(), S = l.num_scales(), H = l.hidden;
  std::vector<Expected> ex(R);
  // records[s][d] = tokens of s for d, in token order
  std::vector<std::vector<std::vector<int>>> records(R, std::vector<std::vector<int>>(R));
  for (int s = 0; s < R; ++s) {
    Expected& e = ex[s];
    e.send_tokens.assign(R, 0);
    e.send_index.assign(static_cast<size_t>(T) * k, -1);
    for (int t = 0; t < in[s].num_tokens; ++t) {
      for (int i = 0; i < k; ++i) {
        const int id = in[s].ids[t * k + i];
        if (id < 0) continue;
        const int d = static_cast<int>(id / L);
        bool first = true;
        for (int j = 0; j < i; ++j) {
          const int o = in[s].ids[t * k + j];
          if (o >= 0 && o / L == d) first = false;
        }
        if (first) records[s][d].push_back(t);
      }
    }
    std::vector<int> base(R, 0);
    for (int d = 1; d < R; ++d) base[d] = base[d - 1] + static_cast<int>(records[s][d - 1].size());
    for (int d = 0; d < R; ++d) {
      e.send_tokens[d] = static_cast<int>(records[s][d].size());
      for (size_t j = 0; j < records[s][d].size(); ++j) {
        const int t = records[s][d][j];
        for (int i = 0; i < k; ++i) {
          const int id = in[s].ids[t * k + i];
          if (id >= 0 && id / L == d) {  // the first such slot owns the record
            e.send_index[t * k + i] = base[d] + static_cast<int>(j);
            break;
          }
        }
      }
    }
  }
  // partial[d][s][j] of the combine, float32 before the combine dtype
  std::vector<std::vector<std::vector<std::vector<float>>>> partial(R);
  for (int d = 0; d < R; ++d) {
    Expected& e = ex[d];
    e.expert_counts.assign(L, 0);
    for (int s = 0; s < R; ++s) {
      for (int t : records[s][d]) {
        for (int i = 0; i < k; ++i) {
          const int id = in[s].ids[t * k + i];
          if (id >= 0 && id / L == d) e.expert_counts[id % L] += 1;
        }
      }
    }
    std::vector<int64_t> start(L), cursor(L);
    int64_t row = 0;
    e.group_sizes.resize(L);
    for (int64_t x = 0; x < L; ++x) {
      e.group_sizes[x] = static_cast<int32_t>(AlignUp(e.expert_counts[x], l.expert_alignment));
      start[x] = cursor[x] = row;
      row += e.group_sizes[x];
    }
    e.rows_needed = row;
    e.recv_tokens.resize(R);
    e.home_offsets.assign(R, 0);
    e.records_needed = 0;
    for (int s = 0; s < R; ++s) {
      e.recv_tokens[s] = static_cast<int32_t>(records[s][d].size());
      e.records_needed += e.recv_tokens[s];
      for (int d2 = 0; d2 < d; ++d2) e.home_offsets[s] += static_cast<int32_t>(records[s][d2].size());
    }
    if (row > M || e.records_needed > N) continue;
    e.expert_x.assign(static_cast<size_t>(M) * xb, 0);
    e.expert_x_scale.assign(static_cast<size_t>(M) * S, 0.0f);
    e.record_rows.assign(static_cast<size_t>(N) * k, -1);
    e.record_weights.assign(static_cast<size_t>(N) * k, 0.0f);
    int64_t g = 0;
    partial[d].resize(R);
    for (int s = 0; s < R; ++s) {
      for (int t : records[s][d]) {
        std::vector<float> acc(H, 0.0f);
        for (int i = 0; i < k; ++i) {
          const int id = in[s].ids[t * k + i];
          if (id < 0 || id / L != d) continue;
          const int64_t r = cursor[id % L]++;
          e.record_rows[g * k + i] = static_cast<int32_t>(r);
          const float w = in[s].weights[t * k + i];
          e.record_weights[g * k + i] = w;
          std::memcpy(&e.expert_x[r * xb], &in[s].x[t * xb], xb);
          for (int64_t c = 0; c < S; ++c) e.expert_x_scale[r * S + c] = in[s].x_scale[t * S + c];
          for (int64_t h = 0; h < H; ++h) {
            const float yv = l.combine_elem_bytes == 2
                                 ? FromBf16(reinterpret_cast<const uint16_t*>(in[d].y.data())[r * H + h])
                                 : reinterpret_cast<const float*>(in[d].y.data())[r * H + h];
            acc[h] = std::fmaf(w, yv, acc[h]);
          }
        }
        if (l.combine_elem_bytes == 2) {
          for (auto& v : acc) v = FromBf16(ToBf16(v));
        }
        partial[d][s].push_back(std::move(acc));
        ++g;
      }
    }
  }
  for (int s = 0; s < R; ++s) {
    Expected& e = ex[s];
    const int64_t cb = l.combine_elem_bytes;
    e.out.assign(static_cast<size_t>(T) * H * cb, 0);
    std::vector<int> base(R, 0);
    for (int d = 1; d < R; ++d) base[d] = base[d - 1] + e.send_tokens[d - 1];
    for (int t = 0; t < in[s].num_tokens; ++t) {
      std::vector<float> acc(H, 0.0f);
      for (int i = 0; i < k; ++i) {
        const int idx = e.send_index[t * k + i];
        if (idx < 0) continue;
        int d = R - 1;
        while (base[d] > idx) --d;
        if (partial[d].empty()) continue;
        const auto& p = partial[d][s][idx - base[d]];
        for (int64_t h = 0; h < H; ++h) acc[h] += p[h];
      }
      for (int64_t h = 0; h < H; ++h) {
        if (cb == 2) {
          reinterpret_cast<uint16_t*>(e.out.data())[t * H + h] = ToBf16(acc[h]);
        } else {
          reinterpret_cast<float*>(e.out.data())[t * H + h] = acc[h];
        }
      }
    }
  }
  return ex;
}

// ---------------------------------------------------------------- device buffers

template <typename T>
struct DeviceArray {
  T* p = nullptr;
  size_t n = 0;
  void Alloc(size_t count) {
    n = count;
    CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)));
  }
  void Upload(const std::vector<T>& v) {
    if (v.size() != n) std::abort();
    CHECK_CUDA(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  void Poison() { CHECK_CUDA(cudaMemset(p, 0xA5, std::max<size_t>(1, n) * sizeof(T))); }
  std::vector<T> Download() const {
    std::vector<T> v(n);
    CHECK_CUDA(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  ~DeviceArray() {
    if (p) cudaFree(p);
  }
};

// One rank's operands and results on its GPU.
// How a step runs: dispatch and combine as halves, the send direct or staged, or as whole ops.
enum class StepKind { kDirect, kStaged, kWhole };

struct RankBuffers {
  int device = 0;
  cudaStream_t stream = nullptr;
  DeviceArray<uint8_t> x, expert_x, y, out;
  DeviceArray<float> x_scale, topk_weights, expert_x_scale, record_weights;
  DeviceArray<int32_t> topk_ids, num_tokens, send_tokens, send_index, expert_counts, group_sizes,
      recv_tokens, record_rows, home_offsets, sent;

  RankBuffers(const Layout& l, int dev) : device(dev) {
    CHECK_CUDA(cudaSetDevice(dev));
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const int64_t T = l.max_tokens, k = l.experts_per_token, M = l.max_recv_tokens;
    const int64_t N = l.max_recv_records(), S = l.num_scales(), H = l.hidden;
    x.Alloc(T * l.x_bytes());
    x_scale.Alloc(T * S);
    topk_ids.Alloc(T * k);
    topk_weights.Alloc(T * k);
    num_tokens.Alloc(1);
    send_tokens.Alloc(l.num_ranks);
    send_index.Alloc(T * k);
    expert_x.Alloc(M * l.x_bytes());
    expert_x_scale.Alloc(M * S);
    expert_counts.Alloc(l.local_experts());
    group_sizes.Alloc(l.local_experts());
    recv_tokens.Alloc(l.num_ranks);
    record_rows.Alloc(N * k);
    record_weights.Alloc(N * k);
    home_offsets.Alloc(l.num_ranks);
    y.Alloc(M * H * l.combine_elem_bytes);
    sent.Alloc(l.num_ranks);
    out.Alloc(T * H * l.combine_elem_bytes);
  }
  ~RankBuffers() { cudaStreamDestroy(stream); }

  void Upload(const RankInput& in) {
    CHECK_CUDA(cudaSetDevice(device));
    x.Upload(in.x);
    x_scale.Upload(in.x_scale);
    topk_ids.Upload(in.ids);
    topk_weights.Upload(in.weights);
    num_tokens.Upload({in.num_tokens});
    if (in.y.empty()) {
      CHECK_CUDA(cudaMemset(y.p, 0x3C, y.n));  // bf16 0x3C3C: about 0.0115
    } else {
      y.Upload(in.y);
    }
    for (auto* a : {&send_tokens, &send_index, &expert_counts, &group_sizes, &recv_tokens,
                    &record_rows, &home_offsets, &sent}) {
      a->Poison();
    }
    expert_x.Poison();
    out.Poison();
    expert_x_scale.Poison();
    record_weights.Poison();
    // cudaMemset returns before it is done, on the legacy stream, which `stream` (non-blocking)
    // does not wait for.
    CHECK_CUDA(cudaDeviceSynchronize());
  }

  // The launchers throw CudaError, which ends the test with its message.
  void DispatchSend(NvlinkContext& c, bool staged) {
    CHECK_CUDA(cudaSetDevice(device));
    c.EnqueueDispatchSend(DispatchSendIo{x.p, x_scale.p, topk_ids.p, topk_weights.p,
                                         num_tokens.p, send_tokens.p, send_index.p},
                          staged, stream);
  }
  void DispatchRecv(const NvlinkContext& c) {
    CHECK_CUDA(cudaSetDevice(device));
    LaunchDispatchRecv(
        c.args(),
        DispatchRecvIo{expert_x.p, expert_x_scale.p, expert_counts.p, group_sizes.p,
                       recv_tokens.p, record_rows.p, record_weights.p, home_offsets.p},
        stream);
  }
  void CombineSend(const NvlinkContext& c) {
    CHECK_CUDA(cudaSetDevice(device));
    LaunchCombineSend(
        c.args(), CombineSendIo{y.p, recv_tokens.p, record_rows.p, record_weights.p, sent.p},
        stream);
  }
  void CombineRecv(const NvlinkContext& c) {
    CHECK_CUDA(cudaSetDevice(device));
    LaunchCombineRecv(c.args(), CombineRecvIo{send_tokens.p, send_index.p, num_tokens.p, out.p},
                      stream);
  }
  // The whole ops, as XLA's dispatch and combine targets run them.
  void Dispatch(NvlinkContext& c) {
    CHECK_CUDA(cudaSetDevice(device));
    c.EnqueueDispatch(DispatchSendIo{x.p, x_scale.p, topk_ids.p, topk_weights.p, num_tokens.p,
                                     send_tokens.p, send_index.p},
                      DispatchRecvIo{expert_x.p, expert_x_scale.p, expert_counts.p,
                                     group_sizes.p, recv_tokens.p, record_rows.p,
                                     record_weights.p, home_offsets.p},
                      stream);
  }
  void Combine(const NvlinkContext& c) {
    CHECK_CUDA(cudaSetDevice(device));
    LaunchCombine(c.args(),
                  CombineSendIo{y.p, recv_tokens.p, record_rows.p, record_weights.p, sent.p},
                  CombineRecvIo{send_tokens.p, send_index.p, num_tokens.p, out.p}, stream);
  }
  // One step: dispatch, then combine, as halves (the send staged or direct) or as whole ops.
  void Step(NvlinkContext& c, StepKind kind) {
    if (kind == StepKind::kWhole) {
      Dispatch(c);
      Combine(c);
      return;
    }
    DispatchSend(c, kind == StepKind::kStaged);
    DispatchRecv(c);
    CombineSend(c);
    CombineRecv(c);
  }
  void Sync() {
    CHECK_CUDA(cudaSetDevice(device));
    CHECK_CUDA(cudaStreamSynchronize(stream));
  }
};

// ---------------------------------------------------------------- rendezvous

// Ranks of this process and their contexts: all ranks (one process), or one (IPC).
struct World {
  int world = 0;
  std::vector<int> local;  // ranks in this process
  std::string rendezvous;  // directory for IPC handles, empty in one process
  int generation = 0;      // contexts created so far (file names differ per context)
  int gpus = 1;            // visible; ranks in processes of their own may share one

  int Device(int rank) const { return rank % gpus; }
  // Every local rank's buffers on its GPU.
  std::vector<std::unique_ptr<RankBuffers>> Buffers(const Layout& l) const {
    std::vector<std::unique_ptr<RankBuffers>> buf;
    for (int r : local) buf.push_back(std::make_unique<RankBuffers>(l, Device(r)));
    return buf;
  }
};

// Every process waits for every other at `tag` (files in the rendezvous directory).
void Barrier(const World& w, const std::string& tag) {
  if (w.rendezvous.empty()) return;
  const std::string prefix = w.rendezvous + "/" + tag + "_";
  std::ofstream(prefix + std::to_string(w.local[0])) << "1";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (int r = 0; r < w.world; ++r) {
    while (!std::ifstream(prefix + std::to_string(r))) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "rank %d: rank %d never reached %s\n", w.local[0], r, tag.c_str());
        std::exit(3);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
}

// Contexts go only once no process's kernels can still write into them.
void Disconnect(const World& w, std::vector<std::unique_ptr<NvlinkContext>>& ctx) {
  for (auto& c : ctx) c->Synchronize();
  Barrier(w, "done" + std::to_string(w.generation));
  ctx.clear();
}

std::vector<std::unique_ptr<NvlinkContext>> Connect(World& w, const Layout& l, double timeout_s,
                                                    bool zero_unused_rows = true,
                                                    int max_sms = 0) {
  std::vector<std::unique_ptr<NvlinkContext>> ctx;
  for (int r : w.local) {
    ctx.push_back(std::make_unique<NvlinkContext>(l, r, w.Device(r), timeout_s,
                                                  zero_unused_rows, max_sms));
  }
  std::vector<NvlinkContext*> local(w.world, nullptr);
  std::vector<Bytes> handles(w.world);
  for (auto& c : ctx) local[c->rank()] = c.get();
  ++w.generation;
  if (!w.rendezvous.empty()) {
    const int me = w.local[0];
    const std::string prefix = w.rendezvous + "/g" + std::to_string(w.generation) + "_";
    {
      // The GPU first: the handle's file appears last, whole (rename).
      std::ofstream(prefix + std::to_string(me) + ".gpu") << ctx[0]->PciAddress();
      const Bytes h = ctx[0]->IpcHandle();
      std::ofstream(prefix + std::to_string(me) + ".tmp", std::ios::binary)
          .write(reinterpret_cast<const char*>(h.data()), h.size());
      std::rename((prefix + std::to_string(me) + ".tmp").c_str(),
                  (prefix + std::to_string(me)).c_str());
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    for (int r = 0; r < w.world; ++r) {
      if (r == me) continue;
      while (true) {
        std::ifstream f(prefix + std::to_string(r), std::ios::binary);
        if (f) {
          handles[r].assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
          if (handles[r].size() == sizeof(cudaIpcMemHandle_t)) break;
        }
        if (std::chrono::steady_clock::now() > deadline) {
          std::fprintf(stderr, "rank %d: no IPC handle from rank %d\n", me, r);
          std::exit(3);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }
  // Ranks that share a GPU (processes on one GPU) store to each other directly.
  std::vector<std::string> gpus;
  for (int r = 0; r < static_cast<int>(local.size()); ++r) {
    std::string gpu;
    if (local[r] != nullptr) {
      gpu = local[r]->PciAddress();
    } else {
      std::ifstream(w.rendezvous + "/g" + std::to_string(w.generation) + "_" +
                    std::to_string(r) + ".gpu") >> gpu;
    }
    gpus.push_back(gpu);
  }
  for (auto& c : ctx) c->Connect(local, handles, gpus);
  Barrier(w, "connected" + std::to_string(w.generation));
  return ctx;
}

// ---------------------------------------------------------------- checks

template <typename T>
int64_t CountDiff(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return n;
}

// Every result of one rank's step against the reference, bit for bit.
void CheckStep(const char* n, int step, int r, RankBuffers& b, const NvlinkContext& ctx,
               const Expected& e) {
  CHECK_CUDA(cudaSetDevice(b.device));
  const std::string f = ctx.Failure();
  EXPECT(f.empty(), "%s step %d rank %d: unexpected error %s", n, step, r, f.c_str());
  EXPECT(CountDiff(b.send_tokens.Download(), e.send_tokens) == 0, "%s r%d send_tokens", n, r);
  EXPECT(CountDiff(b.send_index.Download(), e.send_index) == 0, "%s r%d send_index", n, r);
  EXPECT(CountDiff(b.expert_counts.Download(), e.expert_counts) == 0, "%s r%d expert_counts", n, r);
  EXPECT(CountDiff(b.group_sizes.Download(), e.group_sizes) == 0, "%s r%d group_sizes", n, r);
  EXPECT(CountDiff(b.recv_tokens.Download(), e.recv_tokens) == 0, "%s r%d recv_tokens", n, r);
  EXPECT(CountDiff(b.record_rows.Download(), e.record_rows) == 0, "%s r%d record_rows (%lld)", n,
         r, (long long)CountDiff(b.record_rows.Download(), e.record_rows));
  EXPECT(CountDiff(b.record_weights.Download(), e.record_weights) == 0, "%s r%d record_weights",
         n, r);
  EXPECT(CountDiff(b.expert_x.Download(), e.expert_x) == 0, "%s r%d expert_x (%lld bytes)", n,
         r, (long long)CountDiff(b.expert_x.Download(), e.expert_x));
  EXPECT(CountDiff(b.expert_x_scale.Download(), e.expert_x_scale) == 0, "%s r%d expert_x_scale",
         n, r);
  EXPECT(CountDiff(b.home_offsets.Download(), e.home_offsets) == 0, "%s r%d home_offsets", n, r);
  EXPECT(CountDiff(b.sent.Download(), e.recv_tokens) == 0, "%s r%d sent", n, r);
  const int64_t out_diff = CountDiff(b.out.Download(), e.out);
  EXPECT(out_diff == 0, "%s step %d r%d combine out differs in %lld bytes", n, step, r,
         (long long)out_diff);
}

void RunCase(World& w, const Case& c) {
  const Layout l = c.MakeLayout();
  auto ctx = Connect(w, l, 20.0, true, c.max_sms);
  std::vector<std::unique_ptr<RankBuffers>> buf = w.Buffers(l);
  const bool expect_error = c.expect_capacity_error || c.bad_expert_rank >= 0;
  for (int step = 0; step < c.steps; ++step) {
    std::vector<RankInput> in;
    for (int r = 0; r < c.R; ++r) in.push_back(MakeInput(c, l, step, r));
    for (size_t i = 0; i < buf.size(); ++i) buf[i]->Upload(in[w.local[i]]);
    for (size_t i = 0; i < buf.size(); ++i) {
      // Direct sends, staged sends and whole ops take turns, and differ between neighbouring
      // ranks: a receiver cannot tell them apart.
      buf[i]->Step(*ctx[i], static_cast<StepKind>((step + w.local[i]) % 3));
    }
    for (auto& b : buf) b->Sync();
    if (expect_error) {
      for (size_t i = 0; i < buf.size(); ++i) {
        const std::string f = ctx[i]->Failure();
        const bool right = c.expect_capacity_error
                               ? f.find("routing needs") != std::string::npos
                               : (f.find("not an expert id") != std::string::npos ||
                                  f.find("failed before packing") != std::string::npos);
        EXPECT(right, "%s rank %d: expected an error, got '%s'", c.name.c_str(), w.local[i],
               f.c_str());
        std::printf("  %s rank %d reports: %s\n", c.name.c_str(), w.local[i], f.c_str());
      }
      break;
    }
    const std::vector<Expected> ex = Reference(l, in);
    for (size_t i = 0; i < buf.size(); ++i) {
      CheckStep(c.name.c_str(), step, w.local[i], *buf[i], *ctx[i], ex[w.local[i]]);
    }
  }
  buf.clear();
  Disconnect(w, ctx);
  std::printf("%-28s %s\n", c.name.c_str(), g_failures ? "(failures so far)" : "ok");
  std::fflush(stdout);
}

// The kernels replayed from CUDA graphs, captured as XLA's command buffers capture them: per
// rank a graph of a step of each kind. Steps cycle through an uncaptured staged step (whose
// copies a replayed staged send must not overwrite), the staged graph, the direct graph, the
// staged graph again and the whole-op graph, with new inputs every step; every step is checked.
void RunCaptured(World& w, const Case& c) {
  const Layout l = c.MakeLayout();
  auto ctx = Connect(w, l, 20.0);
  std::vector<std::unique_ptr<RankBuffers>> buf = w.Buffers(l);
  std::vector<cudaGraphExec_t> graphs[3];  // [StepKind][local rank]
  for (int kind = 0; kind < 3; ++kind) {
    for (size_t i = 0; i < buf.size(); ++i) {
      RankBuffers& b = *buf[i];
      CHECK_CUDA(cudaSetDevice(b.device));
      CHECK_CUDA(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal));
      b.Step(*ctx[i], static_cast<StepKind>(kind));
      cudaGraph_t graph;
      CHECK_CUDA(cudaStreamEndCapture(b.stream, &graph));
      cudaGraphExec_t exec;
      CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      CHECK_CUDA(cudaGraphDestroy(graph));
      graphs[kind].push_back(exec);
    }
  }
  for (int step = 0; step < c.steps; ++step) {
    std::vector<RankInput> in;
    for (int r = 0; r < c.R; ++r) in.push_back(MakeInput(c, l, step, r));
    for (size_t i = 0; i < buf.size(); ++i) buf[i]->Upload(in[w.local[i]]);
    for (size_t i = 0; i < buf.size(); ++i) {
      RankBuffers& b = *buf[i];
      CHECK_CUDA(cudaSetDevice(b.device));
      const StepKind cycle[] = {StepKind::kStaged, StepKind::kStaged, StepKind::kDirect,
                                StepKind::kStaged, StepKind::kWhole};
      if (step % 5 == 0) {
        b.Step(*ctx[i], StepKind::kStaged);
      } else {
        CHECK_CUDA(cudaGraphLaunch(graphs[static_cast<int>(cycle[step % 5])][i], b.stream));
      }
    }
    for (auto& b : buf) b->Sync();
    const std::vector<Expected> ex = Reference(l, in);
    for (size_t i = 0; i < buf.size(); ++i) {
      CheckStep(c.name.c_str(), step, w.local[i], *buf[i], *ctx[i], ex[w.local[i]]);
    }
  }
  for (auto& per_rank : graphs) {
    for (cudaGraphExec_t exec : per_rank) CHECK_CUDA(cudaGraphExecDestroy(exec));
  }
  buf.clear();
  Disconnect(w, ctx);
  std::printf("%-28s %s\n", c.name.c_str(), g_failures ? "(failures so far)" : "ok");
  std::fflush(stdout);
}

// An SM budget past the GPU's SMs is refused when the context is made, before it allocates.
void CheckMaxSmsRange(const World& w) {
  Case c;
  c.R = w.world;
  const int r = w.local[0];
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, w.Device(r)));
  for (int bad : {-1, sms + 1}) {
    std::string what;
    try {
      NvlinkContext ctx(c.MakeLayout(), r, w.Device(r), 20.0, true, bad);
    } catch (const Error& e) {
      what = e.what();
    }
    EXPECT(what.find("max_sms = " + std::to_string(bad)) != std::string::npos,
           "max_sms = %d on a GPU of %d SMs: got '%s'", bad, sms, what.c_str());
  }
}

// A layout within every limit but too large for dispatch_send's shared memory (about 270 KB
// per block at 64 ranks): refused at set-up, in the user's terms, before anything is allocated.
void CheckLayoutTooLarge(const World& w) {
  Case c;
  c.R = 64;
  c.E = 4096;
  c.k = 8;
  c.H = 16;
  c.T = 16384;
  std::string what;
  try {
    NvlinkContext ctx(c.MakeLayout(), 0, w.Device(w.local[0]), 20.0, true, 0);
  } catch (const LayoutError& e) {
    what = e.what();
  }
  EXPECT(what.find("bytes of shared memory per block") != std::string::npos &&
             what.find("lower max_tokens_per_rank") != std::string::npos,
         "a layout too large for shared memory: got '%s'", what.c_str());
}

// Halves out of order on every rank at once, as one program runs them: each rank's kernels
// refuse the half and report it (a wait for a peer would end in a timeout error instead).
void RunHalvesOutOfOrder(World& w) {
  Case c;
  c.name = "halves_out_of_order";
  c.R = w.world;
  const Layout l = c.MakeLayout();
  struct Misuse {
    const char* name;
    void (*run)(RankBuffers&, NvlinkContext&);
    const char* says;
  };
  const Misuse misuses[] = {
      {"recv first", [](RankBuffers& b, NvlinkContext& x) { b.DispatchRecv(x); },
       "dispatch_recv ran without a dispatch_send before it"},
      {"send twice",
       [](RankBuffers& b, NvlinkContext& x) {
         b.DispatchSend(x, /*staged=*/true);
         b.DispatchSend(x, /*staged=*/false);
       },
       "dispatch_send ran twice without dispatch_recv between"},
      {"combine recv first",
       [](RankBuffers& b, NvlinkContext& x) {
         b.DispatchSend(x, /*staged=*/false);
         b.DispatchRecv(x);
         b.CombineRecv(x);
       },
       "combine_recv ran without a combine_send before it"},
      {"combine send twice",
       [](RankBuffers& b, NvlinkContext& x) {
         b.DispatchSend(x, /*staged=*/false);
         b.DispatchRecv(x);
         b.CombineSend(x);
         b.CombineSend(x);
       },
       "combine_send ran twice without combine_recv between"},
  };
  for (const Misuse& m : misuses) {
    auto ctx = Connect(w, l, 20.0);
    std::vector<std::unique_ptr<RankBuffers>> buf = w.Buffers(l);
    for (size_t i = 0; i < buf.size(); ++i) {
      buf[i]->Upload(MakeInput(c, l, 0, w.local[i]));
      m.run(*buf[i], *ctx[i]);
    }
    for (auto& b : buf) b->Sync();
    for (size_t i = 0; i < buf.size(); ++i) {
      const std::string f = ctx[i]->Failure();
      EXPECT(f.find(m.says) != std::string::npos, "%s, rank %d: expected '%s', got '%s'", m.name,
             w.local[i], m.says, f.c_str());
    }
    buf.clear();
    Disconnect(w, ctx);
  }
  std::printf("%-28s %s\n", c.name.c_str(), g_failures ? "(failures so far)" : "ok");
  std::fflush(stdout);
}

std::vector<Case> Cases(int world, bool small) {
  std::vector<Case> cases;
  auto add = [&](Case c) {
    c.R = world;
    cases.push_back(c);
  };
  Case c;
  c.name = "uniform_bf16";
  add(c);
  c = Case();
  c.name = "fp8_scales_align8_partial";
  c.dispatch_bytes = 1;
  c.H = 512;
  c.align = 8;
  c.num_tokens = 21;
  add(c);
  c = Case();
  c.name = "fp32_zipf_fp32combine";
  c.dispatch_bytes = 4;
  c.combine_bytes = 4;
  c.routing = Routing::kZipf;
  add(c);
  c = Case();
  c.name = "unused_slots_k6";
  c.k = 6;
  c.E = 24;
  c.routing = Routing::kWithUnused;
  add(c);
  c = Case();
  c.name = "one_expert";
  c.routing = Routing::kOneExpert;
  add(c);
  c = Case();
  c.name = "one_rank_zero_tokens";
  c.routing = Routing::kOneRank;
  c.num_tokens = 0;
  add(c);
  c = Case();
  c.name = "one_rank";
  c.routing = Routing::kOneRank;
  c.steps = small ? 2 : 20;
  add(c);
  c = Case();
  c.name = "capacity_error";
  c.routing = Routing::kOneRank;
  c.max_recv = 40;
  c.expect_capacity_error = true;
  add(c);
  c = Case();
  c.name = "bad_expert_id";
  c.bad_expert_rank = 0;
  add(c);
  // Under SM budgets: the random routings again (fewer under compute-sanitizer), and at T=600
  // pieces of several tokens (the last one short, num_tokens inside a block's range).
  std::vector<std::string> routed = {"uniform_bf16", "fp8_scales_align8_partial"};
  if (!small) routed.insert(routed.end(), {"fp32_zipf_fp32combine", "unused_slots_k6"});
  for (int budget : small ? std::vector<int>{1, 3} : std::vector<int>{1, 3, 7}) {
    for (const std::string& name : routed) {
      c = *std::find_if(cases.begin(), cases.end(), [&](const Case& x) { return x.name == name; });
      c.name = name + "_sms" + std::to_string(budget);
      c.max_sms = budget;
      add(c);
    }
  }
  if (!small) {
    c = Case();
    c.name = "zipf_T600_sms7";
    c.E = 64;
    c.k = 8;
    c.T = 600;
    c.num_tokens = 517;
    c.routing = Routing::kZipf;
    c.max_sms = 7;
    add(c);
    c = Case();
    c.name = "deepseek_T128_fp8";
    c.dispatch_bytes = 1;
    c.E = 256;
    c.k = 8;
    c.H = 7168;
    c.T = 128;
    c.steps = 2;
    add(c);
  }
  return cases;
}

// ---------------------------------------------------------------- benchmark

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
double P99(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, v.size() * 99 / 100)];
}

// Keeps a GPU idle until the host has queued a whole batch of steps, so that the events time
// the GPU and not the host's launches (as when XLA runs ahead of the device).
__global__ void Hold(const volatile uint32_t* go, uint64_t timeout_ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (*go == 0 && now - start < timeout_ns);
}

struct BenchConfig {
  std::string name;
  int T = 128;
  int H = 7168;
  bool zero_unused_rows = true;
  int iters = 500;
  StepKind kind = StepKind::kDirect;
  bool hold = true;  // off under a profiler, which serializes launches
  // Steps replayed from one CUDA graph per rank, as XLA's command buffers replay them, with
  // no event between the kernels (events cost more than a kernel boundary in a graph): only
  // whole steps are timed.
  bool graph = false;
};

// The variants time T=128 without its payload (H=128) and without zeroing expert_x's unused
// rows, and one token alone: what is left is the fixed cost of each kernel. "whole" times the
// whole ops (one kernel each), as XLA's dispatch and combine targets run them.
const std::vector<BenchConfig> kBenchConfigs = {
    {"T=128", 128, 7168, true, 500},
    {"T=128 whole", 128, 7168, true, 500, StepKind::kWhole},
    {"T=128 no zeroing", 128, 7168, false, 500},
    {"T=128 H=128 no zeroing", 128, 128, false, 500},
    {"T=1 H=128 no zeroing", 1, 128, false, 500},
    {"T=1 H=128 no zeroing whole", 1, 128, false, 500, StepKind::kWhole},
    {"T=4096", 4096, 7168, true, 100},
    {"T=4096 whole", 4096, 7168, true, 100, StepKind::kWhole},
    {"T=4096 no zeroing", 4096, 7168, false, 100},
    {"T=128 staged", 128, 7168, true, 500, StepKind::kStaged},
    {"T=4096 staged", 4096, 7168, true, 100, StepKind::kStaged},
    {"T=1 H=128 no zeroing, graph", 1, 128, false, 500, StepKind::kDirect, true, true},
    {"T=1 H=128 no zeroing whole, graph", 1, 128, false, 500, StepKind::kWhole, true, true},
    {"T=128, graph", 128, 7168, true, 500, StepKind::kDirect, true, true},
    {"T=128 whole, graph", 128, 7168, true, 500, StepKind::kWhole, true, true},
    {"T=4096, graph", 4096, 7168, true, 100, StepKind::kDirect, true, true},
    {"T=4096 whole, graph", 4096, 7168, true, 100, StepKind::kWhole, true, true},
};

// Per step (dispatch and combine), µs: `iters` steps replayed from graphs of 25 steps, one
// graph per local rank, each replay between two events. The last step is checked again.
std::vector<double> GraphStepUs(World& w, const Case& c, const Layout& l, int iters,
                                std::vector<std::unique_ptr<RankBuffers>>& buf,
                                std::vector<std::unique_ptr<NvlinkContext>>& ctx,
                                const std::vector<RankInput>& in, StepKind kind) {
  constexpr int kBatch = 25;
  std::vector<cudaGraphExec_t> graphs;
  for (size_t i = 0; i < buf.size(); ++i) {
    RankBuffers& b = *buf[i];
    CHECK_CUDA(cudaSetDevice(b.device));
    CHECK_CUDA(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal));
    for (int s = 0; s < kBatch; ++s) b.Step(*ctx[i], kind);
    cudaGraph_t graph;
    CHECK_CUDA(cudaStreamEndCapture(b.stream, &graph));
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    CHECK_CUDA(cudaGraphDestroy(graph));
    graphs.push_back(exec);
  }
  std::vector<cudaEvent_t> ev(2 * buf.size());
  for (size_t i = 0; i < buf.size(); ++i) {
    CHECK_CUDA(cudaSetDevice(buf[i]->device));
    CHECK_CUDA(cudaEventCreate(&ev[2 * i]));
    CHECK_CUDA(cudaEventCreate(&ev[2 * i + 1]));
  }
  std::vector<double> us;
  for (int first = -kBatch; first < iters; first += kBatch) {  // one replay to warm up
    for (size_t i = 0; i < buf.size(); ++i) {
      RankBuffers& b = *buf[i];
      CHECK_CUDA(cudaSetDevice(b.device));
      CHECK_CUDA(cudaEventRecord(ev[2 * i], b.stream));
      CHECK_CUDA(cudaGraphLaunch(graphs[i], b.stream));
      CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], b.stream));
    }
    for (auto& b : buf) b->Sync();
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    if (first >= 0) us.push_back(1e3 * ms / kBatch);
  }
  const std::vector<Expected> ex = Reference(l, in);
  for (size_t i = 0; i < buf.size(); ++i) {
    CheckStep(c.name.c_str(), iters, w.local[i], *buf[i], *ctx[i], ex[w.local[i]]);
  }
  for (cudaGraphExec_t exec : graphs) CHECK_CUDA(cudaGraphExecDestroy(exec));
  for (cudaEvent_t e : ev) CHECK_CUDA(cudaEventDestroy(e));
  return us;
}

// A benchmark configuration's case (256 experts, top-8, fp8 dispatch, bf16 combine) on every
// rank of `w`, connected, with step 0's inputs of every rank (in[r]) uploaded to the local ones.
struct BenchSetup {
  Case c;
  Layout l;
  std::vector<std::unique_ptr<NvlinkContext>> ctx;
  std::vector<std::unique_ptr<RankBuffers>> buf;
  std::vector<RankInput> in;
};

BenchSetup SetUpBench(World& w, const BenchConfig& bc) {
  BenchSetup b;
  b.c.name = "bench";
  b.c.R = w.world;
  b.c.E = 256;
  b.c.k = 8;
  b.c.H = bc.H;
  b.c.T = bc.T;
  b.c.dispatch_bytes = 1;
  b.c.combine_bytes = 2;
  b.l = b.c.MakeLayout();
  b.ctx = Connect(w, b.l, 20.0, bc.zero_unused_rows);
  for (int r = 0; r < b.c.R; ++r) b.in.push_back(MakeInput(b.c, b.l, 0, r));
  for (int r : w.local) {
    b.buf.push_back(std::make_unique<RankBuffers>(b.l, w.Device(r)));
    b.buf.back()->Upload(b.in[r]);
  }
  return b;
}

std::string Bench(World& w, const BenchConfig& bc) {
  const int T = bc.T, iters = bc.iters;
  BenchSetup setup = SetUpBench(w, bc);
  const Case& c = setup.c;
  const Layout& l = setup.l;
  auto& ctx = setup.ctx;
  auto& buf = setup.buf;
  const std::vector<RankInput>& in = setup.in;
  // One step checked against the host reference before anything is timed. Unzeroed unused
  // rows hold whatever was there, which the reference cannot know: those variants run the
  // same kernels as their zeroing twins, checked in their own runs.
  for (size_t i = 0; i < buf.size(); ++i) buf[i]->Step(*ctx[i], bc.kind);
  for (auto& b : buf) b->Sync();
  if (bc.zero_unused_rows) {
    const std::vector<Expected> ex = Reference(l, in);
    for (size_t i = 0; i < buf.size(); ++i) {
      CheckStep(bc.name.c_str(), 0, w.local[i], *buf[i], *ctx[i], ex[w.local[i]]);
    }
  }
  if (bc.graph) {
    const std::vector<double> step = GraphStepUs(w, c, l, iters, buf, ctx, in, bc.kind);
    for (size_t i = 0; i < buf.size(); ++i) {
      EXPECT(ctx[i]->Failure().empty(), "bench error %s", ctx[i]->Failure().c_str());
    }
    std::ostringstream js;
    js << "{\"name\": \"" << bc.name << "\", \"T\": " << T << ", \"H\": " << bc.H
       << ", \"zero_unused_rows\": " << (bc.zero_unused_rows ? "true" : "false")
       << ", \"whole\": " << (bc.kind == StepKind::kWhole ? "true" : "false")
       << ", \"graph\": true, \"iters\": " << iters << ", \"step_us\": {\"median\": "
       << Median(step) << ", \"p99\": " << P99(step) << "}}";
    std::printf("%-34s T=%5d  dispatch + combine %8.2f us per step (p99 %8.2f)\n",
                bc.name.c_str(), T, Median(step), P99(step));
    buf.clear();
    Disconnect(w, ctx);
    return js.str();
  }
  uint32_t* go = nullptr;
  CHECK_CUDA(cudaHostAlloc(&go, sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable));
  // events on every local rank: before send, after dispatch send, after dispatch recv, after
  // combine send, after combine recv (whole ops: before, after dispatch, after combine)
  const bool whole = bc.kind == StepKind::kWhole;
  const int kMarks = 5;
  std::vector<std::vector<cudaEvent_t>> ev(buf.size(), std::vector<cudaEvent_t>(kMarks * iters));
  for (size_t i = 0; i < buf.size(); ++i) {
    CHECK_CUDA(cudaSetDevice(buf[i]->device));
    for (auto& e : ev[i]) CHECK_CUDA(cudaEventCreate(&e));
  }
  auto run = [&](int it, bool mark) {
    for (size_t i = 0; i < buf.size(); ++i) {
      RankBuffers& b = *buf[i];
      auto m = [&](int j) {
        if (mark) CHECK_CUDA(cudaEventRecord(ev[i][it * kMarks + j], b.stream));
      };
      m(0);
      if (whole) {
        b.Dispatch(*ctx[i]);
        m(2);
        b.Combine(*ctx[i]);
        m(4);
        continue;
      }
      b.DispatchSend(*ctx[i], bc.kind == StepKind::kStaged);
      m(1);
      b.DispatchRecv(*ctx[i]);
      m(2);
      b.CombineSend(*ctx[i]);
      m(3);
      b.CombineRecv(*ctx[i]);
      m(4);
    }
  };
  for (int it = 0; it < 20; ++it) run(it, false);
  for (auto& b : buf) b->Sync();
  constexpr int kBatch = 25;
  for (int first = 0; first < iters; first += kBatch) {
    *reinterpret_cast<volatile uint32_t*>(go) = 0;
    for (auto& b : buf) {
      if (!bc.hold) break;
      CHECK_CUDA(cudaSetDevice(b->device));
      Hold<<<1, 1, 0, b->stream>>>(go, 5'000'000'000ull);
      CHECK_CUDA(cudaGetLastError());
    }
    for (int it = first; it < std::min(iters, first + kBatch); ++it) run(it, true);
    *reinterpret_cast<volatile uint32_t*>(go) = 1;
    for (auto& b : buf) b->Sync();
  }
  CHECK_CUDA(cudaFreeHost(go));
  for (size_t i = 0; i < buf.size(); ++i) {
    EXPECT(ctx[i]->Failure().empty(), "bench error %s", ctx[i]->Failure().c_str());
  }
  std::vector<double> phase[4], dispatch, combine;
  const auto elapsed_us = [&](int it, int from, int to) {
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, ev[0][it * kMarks + from], ev[0][it * kMarks + to]));
    return ms * 1e3;
  };
  for (int it = 0; it < iters; ++it) {
    for (int j = 0; !whole && j < 4; ++j) phase[j].push_back(elapsed_us(it, j, j + 1));
    dispatch.push_back(elapsed_us(it, 0, 2));
    combine.push_back(elapsed_us(it, 2, 4));
  }
  // bytes of this rank's records and partials that cross NVLink (to other ranks)
  std::vector<int32_t> st = buf[0]->send_tokens.Download();
  int64_t remote = 0;
  for (int d = 0; d < c.R; ++d) remote += d == w.local[0] ? 0 : st[d];
  std::vector<int32_t> rt = buf[0]->recv_tokens.Download();
  int64_t remote_back = 0;
  for (int s = 0; s < c.R; ++s) remote_back += s == w.local[0] ? 0 : rt[s];
  const double dispatch_bytes = static_cast<double>(remote) * l.record_bytes();
  const double combine_bytes = static_cast<double>(remote_back) * l.combine_row_bytes();
  std::ostringstream js;
  const char* names[4] = {"dispatch_send", "dispatch_recv", "combine_send", "combine_recv"};
  js << "{\"name\": \"" << bc.name << "\", \"T\": " << T << ", \"H\": " << bc.H
     << ", \"zero_unused_rows\": " << (bc.zero_unused_rows ? "true" : "false")
     << ", \"staged\": " << (bc.kind == StepKind::kStaged ? "true" : "false")
     << ", \"whole\": " << (whole ? "true" : "false") << ", \"iters\": " << iters;
  for (int j = 0; !whole && j < 4; ++j) {
    js << ", \"" << names[j] << "_us\": {\"median\": " << Median(phase[j])
       << ", \"p99\": " << P99(phase[j]) << "}";
  }
  js << ", \"dispatch_us\": {\"median\": " << Median(dispatch) << ", \"p99\": " << P99(dispatch)
     << "}, \"combine_us\": {\"median\": " << Median(combine) << ", \"p99\": " << P99(combine)
     << "}, \"dispatch_nvlink_bytes\": " << dispatch_bytes
     << ", \"combine_nvlink_bytes\": " << combine_bytes << "}";
  std::printf("%-22s T=%5d  dispatch %8.2f us (send %7.2f recv %7.2f)  combine %8.2f us (send %7.2f "
              "recv %7.2f)  p99 %8.2f / %8.2f  NVLink bytes out %.1f MB / %.1f MB\n",
              bc.name.c_str(), T, Median(dispatch), Median(phase[0]), Median(phase[1]), Median(combine),
              Median(phase[2]), Median(phase[3]), P99(dispatch), P99(combine),
              dispatch_bytes / 1e6, combine_bytes / 1e6);
  for (size_t i = 0; i < buf.size(); ++i) {
    CHECK_CUDA(cudaSetDevice(buf[i]->device));
    for (auto& e : ev[i]) cudaEventDestroy(e);
  }
  buf.clear();
  Disconnect(w, ctx);
  return js.str();
}

// Where a step's time goes: steps run one at a time with the phase clock on (every block of
// rank 0 stamps %globaltimer as each phase ends, NvlinkArgs::phase_clock); per phase, the
// median over steps of when the first and the last block got there, µs from the op's start
// (the first block's first stamp).
const char* const kPhaseNames[kNumPhases] = {
    "dispatch start", "counted", "ranked", "packed", "send ticket", "routed",
    "ready flags seen", "expanded", "zeroed", "end", "combine start", "credits seen",
    "partials stored", "send ticket", "ready flags seen", "reduced", "end"};

std::string Phases(World& w, const BenchConfig& bc, int steps) {
  BenchSetup setup = SetUpBench(w, bc);
  auto& ctx = setup.ctx;
  auto& buf = setup.buf;
  const int blocks = 2 * ctx[0]->args().num_sms;
  const size_t words = static_cast<size_t>(blocks) * kNumPhases;
  CHECK_CUDA(cudaSetDevice(buf[0]->device));
  uint64_t* stamps = nullptr;
  CHECK_CUDA(cudaMalloc(&stamps, words * sizeof(uint64_t)));
  ctx[0]->SetPhaseClock(stamps);
  std::vector<uint64_t> host(words);
  std::vector<double> first[kNumPhases], last[kNumPhases];
  for (int step = -5; step < steps; ++step) {  // 5 steps to warm up
    CHECK_CUDA(cudaSetDevice(buf[0]->device));
    CHECK_CUDA(cudaMemset(stamps, 0, words * sizeof(uint64_t)));
    for (size_t i = 0; i < buf.size(); ++i) buf[i]->Step(*ctx[i], bc.kind);
    for (auto& b : buf) b->Sync();
    CHECK_CUDA(cudaMemcpy(host.data(), stamps, words * sizeof(uint64_t), cudaMemcpyDeviceToHost));
    if (step < 0) continue;
    for (int op = 0; op < 2; ++op) {
      const int begin = op == 0 ? kDispatchStart : kCombineStart;
      const int end = op == 0 ? kCombineStart : kNumPhases;
      uint64_t t0 = ~0ull;
      for (int b = 0; b < blocks; ++b) {
        const uint64_t t = host[static_cast<size_t>(b) * kNumPhases + begin];
        if (t != 0) t0 = std::min(t0, t);
      }
      for (int p = begin; p < end; ++p) {
        uint64_t lo = ~0ull, hi = 0;
        for (int b = 0; b < blocks; ++b) {
          const uint64_t t = host[static_cast<size_t>(b) * kNumPhases + p];
          if (t == 0) continue;
          lo = std::min(lo, t);
          hi = std::max(hi, t);
        }
        if (hi == 0) continue;  // no block got there (the recv half of a split op: none)
        first[p].push_back((lo - t0) / 1e3);
        last[p].push_back((hi - t0) / 1e3);
      }
    }
  }
  ctx[0]->SetPhaseClock(nullptr);
  CHECK_CUDA(cudaFree(stamps));
  for (size_t i = 0; i < buf.size(); ++i) {
    EXPECT(ctx[i]->Failure().empty(), "phases error %s", ctx[i]->Failure().c_str());
  }
  std::ostringstream js;
  js << "{\"name\": \"" << bc.name << "\", \"steps\": " << steps << ", \"phases\": [";
  std::printf("%s, phases (us from the op's start: first block, last block):\n",
              bc.name.c_str());
  bool any = false;
  for (int p = 0; p < kNumPhases; ++p) {
    if (first[p].empty()) continue;
    js << (any ? ", " : "") << "{\"op\": \"" << (p < kCombineStart ? "dispatch" : "combine")
       << "\", \"phase\": \"" << kPhaseNames[p] << "\", \"first_us\": " << Median(first[p])
       << ", \"last_us\": " << Median(last[p]) << "}";
    any = true;
    std::printf("  %-9s %-22s %8.2f %8.2f\n", p < kCombineStart ? "dispatch" : "combine",
                kPhaseNames[p], Median(first[p]), Median(last[p]));
  }
  js << "]}";
  buf.clear();
  Disconnect(w, ctx);
  return js.str();
}

__global__ void Empty() {}

// Median µs between two events around an empty kernel of `blocks` x 512 threads on GPU 0,
// launches queued ahead as in Bench: what any kernel of this test costs before its work.
double EmptyKernelUs(int blocks) {
  CHECK_CUDA(cudaSetDevice(0));
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  uint32_t* go = nullptr;
  CHECK_CUDA(cudaHostAlloc(&go, sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable));
  constexpr int kIters = 200;
  std::vector<cudaEvent_t> ev(2 * kIters);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  *reinterpret_cast<volatile uint32_t*>(go) = 0;
  Hold<<<1, 1, 0, s>>>(go, 5'000'000'000ull);
  for (int i = 0; i < kIters; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], s));
    Empty<<<blocks, 512, 0, s>>>();
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], s));
  }
  *reinterpret_cast<volatile uint32_t*>(go) = 1;
  CHECK_CUDA(cudaStreamSynchronize(s));
  std::vector<double> us;
  for (int i = 10; i < kIters; ++i) {
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us.push_back(ms * 1e3);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  cudaFreeHost(go);
  cudaStreamDestroy(s);
  return Median(us);
}

// One-way peer copy GPU0 -> GPU1 of `bytes`: the NVLink ceiling.
double PeerCopyGBps(size_t bytes) {
  void *src = nullptr, *dst = nullptr;
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    const cudaError_t err = cudaDeviceEnablePeerAccess(1 - d, 0);
    if (err != cudaErrorPeerAccessAlreadyEnabled) CHECK_CUDA(err);
    cudaGetLastError();
  }
  CHECK_CUDA(cudaSetDevice(1));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaSetDevice(0));
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMemset(src, 1, bytes));
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreate(&s));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> gbps;
  for (int i = 0; i < 6; ++i) {
    CHECK_CUDA(cudaEventRecord(a, s));
    CHECK_CUDA(cudaMemcpyPeerAsync(dst, 1, src, 0, bytes, s));
    CHECK_CUDA(cudaEventRecord(b, s));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    if (i > 0) gbps.push_back(bytes / (ms * 1e-3) / 1e9);
  }
  cudaFree(src);
  CHECK_CUDA(cudaSetDevice(1));
  cudaFree(dst);
  CHECK_CUDA(cudaSetDevice(0));
  return Median(gbps);
}

}  // namespace
}  // namespace jem

int main(int argc, char** argv) {
  using namespace jem;
  World w;
  bool small = false;
  std::string bench_out, profile;
  int rank = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--rank" && i + 1 < argc) rank = std::atoi(argv[++i]);
    else if (a == "--world" && i + 1 < argc) w.world = std::atoi(argv[++i]);
    else if (a == "--rendezvous" && i + 1 < argc) w.rendezvous = argv[++i];
    else if (a == "--small") small = true;
    else if (a == "--bench" && i + 1 < argc) bench_out = argv[++i];
    else if (a == "--profile" && i + 1 < argc) profile = argv[++i];
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  int devices = 0;
  CHECK_CUDA(cudaGetDeviceCount(&devices));
  w.gpus = std::max(devices, 1);
  if (rank >= 0) {
    if (w.world < 1 || w.rendezvous.empty()) {
      std::fprintf(stderr, "--rank needs --world and --rendezvous\n");
      return 2;
    }
    w.local = {rank};
  } else {
    if (w.world < 1) w.world = std::min(devices, 2);
    if (w.world > devices) {
      // Kernels of one process do not time-slice: ranks sharing a GPU need processes.
      std::fprintf(stderr, "%d ranks in one process need %d GPUs\n", w.world, w.world);
      return 2;
    }
    for (int r = 0; r < w.world; ++r) w.local.push_back(r);
  }
  std::printf("world %d, local ranks:", w.world);
  for (int r : w.local) std::printf(" %d", r);
  std::printf(" (%d GPUs visible)\n", devices);
  if (!profile.empty()) {
    auto it = std::find_if(kBenchConfigs.begin(), kBenchConfigs.end(),
                           [&](const BenchConfig& c) { return c.name == profile; });
    if (it == kBenchConfigs.end()) {
      std::fprintf(stderr, "no benchmark configuration named '%s'\n", profile.c_str());
      return 2;
    }
    BenchConfig c = *it;
    c.iters = 10;
    c.hold = false;
    Bench(w, c);
  } else if (!bench_out.empty()) {
    // The NVLink ceiling, where there is a second GPU to copy to.
    const double peer_gbps = devices >= 2 ? PeerCopyGBps(1ull << 30) : 0.0;
    std::string js = "{\"peer_copy_1GiB_GBps\": " + std::to_string(peer_gbps);
    if (devices >= 2) std::printf("peer copy GPU0->GPU1, 1 GiB: %.1f GB/s\n", peer_gbps);
    const double empty_one = EmptyKernelUs(1), empty_grid = EmptyKernelUs(264);
    std::printf("empty kernel between events: 1x512 %.2f us, 264x512 %.2f us\n", empty_one,
                empty_grid);
    js += ", \"empty_kernel_us\": {\"1x512\": " + std::to_string(empty_one) +
          ", \"264x512\": " + std::to_string(empty_grid) + "}";
    js += ", \"runs\": [";
    for (size_t i = 0; i < kBenchConfigs.size(); ++i) {
      js += (i ? ", " : "") + Bench(w, kBenchConfigs[i]);
    }
    js += "], \"phases\": [";
    const char* phased[] = {"T=1 H=128 no zeroing whole", "T=128 whole", "T=128",
                            "T=4096 whole"};
    for (size_t i = 0; i < std::size(phased); ++i) {
      const auto it = std::find_if(kBenchConfigs.begin(), kBenchConfigs.end(),
                                   [&](const BenchConfig& c) { return c.name == phased[i]; });
      js += (i ? ", " : "") + Phases(w, *it, it->T > 1024 ? 20 : 100);
    }
    js += "]}";
    std::ofstream(bench_out) << js << "\n";
  } else {
    CheckMaxSmsRange(w);
    CheckLayoutTooLarge(w);
    for (const Case& c : Cases(w.world, small)) RunCase(w, c);
    Case captured;
    captured.name = "captured_graphs_fp8";
    captured.R = w.world;
    captured.dispatch_bytes = 1;
    captured.H = 512;
    captured.steps = small ? 8 : 24;
    RunCaptured(w, captured);
    RunHalvesOutOfOrder(w);
  }
  std::printf("%s: %d failures\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
