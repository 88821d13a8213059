// The GPU path's fabric proxy without a GPU: ranks (fork) over tcp;ofi_rxm, each a FabricProxy
// on its engine, with this test playing the kernels in host memory: per step, fill the
// outboxes for fabric peers with bytes seeded by (sender, receiver, step), publish counts and
// the step in the mailbox, wait for the flags the proxy raises, check every byte that landed
// from every fabric peer, then publish the read step and wait for the credits. Dispatch and
// combine, several steps; 3 ranks each a node of its own, then 2 nodes of 2 ranks (the
// NVLink peers are left to the kernels, so the proxy must leave them alone), and the proxy's
// step timings count every step. CMake and Bazel also run it with JEM_REORDER_SEED (arrivals
// out of order, as on EFA). Exit code 0 on success.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cc/a2a/fabric_proxy.h"
#include "cc/base/layout.h"
#include "cc/base/nvlink_layout.h"
#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/backoff.h"
#include "cc/transfer_engine/forked_ranks.h"

namespace jem {
namespace {

constexpr int kSteps = 12;
constexpr double kTimeoutS = 30.0;

// What the bytes and counts of one (sender, receiver, step) are made from.
enum Part : uint64_t { kCount, kRouteRow, kSlotRanks, kRecords, kPartials, kPartialCount };

uint64_t Seed(int sender, int receiver, int step, Part part) {
  return ((uint64_t(sender) * 64 + receiver) * 1000 + step) * 8 + part;
}

void Fill(uint8_t* p, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
}

bool Same(const uint8_t* p, int64_t n, uint64_t seed) {
  std::vector<uint8_t> want(n);
  Fill(want.data(), n, seed);
  return std::memcmp(p, want.data(), n) == 0;
}

int32_t Count(int sender, int receiver, int step, Part part, int64_t max) {
  return static_cast<int32_t>(std::mt19937_64(Seed(sender, receiver, step, part))() % (max + 1));
}

Layout TestLayout(int ranks) {
  Layout l;
  l.num_ranks = ranks;
  l.num_experts = 2 * ranks;
  l.experts_per_token = 2;
  l.hidden = 128;
  l.max_tokens = 6;
  l.max_recv_tokens = ranks * l.max_tokens * l.experts_per_token;
  return l;
}

// What the kernels of one rank would do, on host memory.
class FakeKernels {
 public:
  FakeKernels(const NvlinkLayout& nl, int rank, uint64_t fabric_mask, uint8_t* buffer,
              ProxyMailbox* mailbox, uint8_t* signals)
      : nl_(nl), rank_(rank), fabric_mask_(fabric_mask), buffer_(buffer), mailbox_(mailbox),
        signals_(signals) {}

  void SendDispatch(int step) {
    const Layout& l = nl_.layout;
    for (int d = 0; d < nl_.R(); ++d) {
      if (!Fabric(d)) continue;
      const int32_t n = Count(rank_, d, step, kCount, l.max_tokens);
      Fill(buffer_ + nl_.outbox_route_offset(d), nl_.route_row_ints() * 4,
           Seed(rank_, d, step, kRouteRow));
      Fill(buffer_ + nl_.outbox_slot_rank_offset(d, 0), n * l.experts_per_token * 4,
           Seed(rank_, d, step, kSlotRanks));
      Fill(buffer_ + nl_.outbox_record_offset(d, 0), n * l.record_bytes(),
           Seed(rank_, d, step, kRecords));
      mailbox_->dispatch_counts[d] = n;
    }
    __atomic_store_n(&mailbox_->dispatch_sent, uint64_t(step), __ATOMIC_RELEASE);
  }

  // Empty, or which bytes from which sender differ.
  std::string CheckDispatch(int step) const {
    const Layout& l = nl_.layout;
    std::string wrong;
    for (int s = 0; s < nl_.R(); ++s) {
      if (!Fabric(s)) {
        // An NVLink peer's slot is its kernels' to write, never the proxy's.
        const uint8_t* row = buffer_ + nl_.route_row_offset(s);
        if (s != rank_ && std::any_of(row, row + nl_.route_row_ints() * 4,
                                      [](uint8_t b) { return b != 0; })) {
          wrong += " rank " + std::to_string(s) + " (an NVLink peer)";
        }
        continue;
      }
      const int32_t n = Count(s, rank_, step, kCount, l.max_tokens);
      if (!Same(buffer_ + nl_.route_row_offset(s), nl_.route_row_ints() * 4,
                Seed(s, rank_, step, kRouteRow)) ||
          !Same(buffer_ + nl_.slot_rank_record_offset(s, 0), n * l.experts_per_token * 4,
                Seed(s, rank_, step, kSlotRanks)) ||
          !Same(buffer_ + nl_.record_offset(s, 0), n * l.record_bytes(),
                Seed(s, rank_, step, kRecords))) {
        wrong += " rank " + std::to_string(s);
      }
    }
    return wrong;
  }

  void SendCombine(int step) {
    for (int home = 0; home < nl_.R(); ++home) {
      if (!Fabric(home)) continue;
      const int32_t n = Count(rank_, home, step, kPartialCount, nl_.layout.max_tokens);
      Fill(buffer_ + nl_.combine_outbox_offset(home, 0), n * nl_.layout.combine_row_bytes(),
           Seed(rank_, home, step, kPartials));
      mailbox_->combine_counts[home] = n;
    }
    __atomic_store_n(&mailbox_->combine_sent, uint64_t(step), __ATOMIC_RELEASE);
  }

  std::string CheckCombine(int step) const {
    std::string wrong;
    for (int s = 0; s < nl_.R(); ++s) {
      if (!Fabric(s)) continue;
      const int32_t n = Count(s, rank_, step, kPartialCount, nl_.layout.max_tokens);
      if (!Same(buffer_ + nl_.partial_offset(s, 0), n * nl_.layout.combine_row_bytes(),
                Seed(s, rank_, step, kPartials))) {
        wrong += " rank " + std::to_string(s);
      }
    }
    return wrong;
  }

  void Read(uint64_t* word, int step) { __atomic_store_n(word, uint64_t(step), __ATOMIC_RELEASE); }

  // Waits until the flag at offset_of(peer) shows `step` (SignalOf) for every peer.
  template <typename OffsetOf>
  bool Await(OffsetOf offset_of, int step) const {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::duration<double>(kTimeoutS);
    const Backoff backoff(/*busy_poll=*/false, start);
    for (int p = 0; p < nl_.R(); ++p) {
      if (!Fabric(p)) continue;
      const auto* flag = reinterpret_cast<const uint64_t*>(signals_ + offset_of(p));
      while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < SignalOf(step)) {
        const auto now = std::chrono::steady_clock::now();
        if (now > deadline) return false;
        backoff.Pause(now);
      }
    }
    return true;
  }

 private:
  bool Fabric(int peer) const { return (fabric_mask_ >> peer) & 1; }

  const NvlinkLayout& nl_;
  int rank_;
  uint64_t fabric_mask_;
  uint8_t* buffer_;
  ProxyMailbox* mailbox_;
  uint8_t* signals_;
};

int Run(int rank, int ranks, int ranks_per_node, const AllGather& all_gather) {
  const NvlinkLayout nl{TestLayout(ranks)};
  EngineOptions options;
  options.provider = "tcp;ofi_rxm";
  auto engine = TransferEngine::Create(options);
  std::vector<uint8_t> buffer(nl.arena_bytes(), 0);
  std::vector<uint64_t> words(nl.proxy_words_bytes() / 8 + 1, 0);
  auto* mailbox = reinterpret_cast<ProxyMailbox*>(words.data());
  auto* signals = reinterpret_cast<uint8_t*>(words.data()) + nl.proxy_signals_offset();
  const MemoryRegionId region =
      engine->RegisterMemory(buffer.data(), buffer.size(), MemoryKind::kHost);
  const std::vector<Bytes> addresses = all_gather(engine->Address());
  const std::vector<Bytes> descriptors = all_gather(engine->Descriptor(region));
  std::vector<PeerSpec> peers;
  uint64_t other_nodes = 0;
  for (int r = 0; r < ranks; ++r) {
    peers.push_back({addresses[r], descriptors[r]});
    if (r / ranks_per_node != rank / ranks_per_node) other_nodes |= uint64_t(1) << r;
  }

  bool ok = true;
  {
    FabricProxy proxy(*engine, nl.layout, rank, other_nodes, region, mailbox, signals, peers);
    FakeKernels kernels(nl, rank, other_nodes, buffer.data(), mailbox, signals);
    // One phase of one step, as its kernels see it: send, wait for the data, check it,
    // consume it, wait for the credits. False at the first failure, said on stderr.
    const auto phase = [&](const char* name, int step, auto send, auto ready_offset,
                           auto check, uint64_t* read, auto credit_offset) {
      send(step);
      std::string problem;
      if (!kernels.Await(ready_offset, step)) {
        problem = "no ready flag within the deadline";
      } else if (const std::string wrong = check(step); !wrong.empty()) {
        problem = "wrong bytes from" + wrong;
      } else {
        kernels.Read(read, step);
        if (!kernels.Await(credit_offset, step)) problem = "no credit within the deadline";
      }
      if (!problem.empty()) {
        std::fprintf(stderr, "rank %d, step %d, %s: %s\n", rank, step, name, problem.c_str());
      }
      return problem.empty();
    };
    for (int step = 1; step <= kSteps && ok; ++step) {
      ok = phase("dispatch", step, [&](int s) { kernels.SendDispatch(s); },
                 [&](int p) { return nl.dispatch_ready_offset(p); },
                 [&](int s) { return kernels.CheckDispatch(s); }, &mailbox->dispatch_read,
                 [&](int p) { return nl.dispatch_credit_offset(p); }) &&
           phase("combine", step, [&](int s) { kernels.SendCombine(s); },
                 [&](int p) { return nl.combine_ready_offset(p); },
                 [&](int s) { return kernels.CheckCombine(s); }, &mailbox->combine_read,
                 [&](int p) { return nl.combine_credit_offset(p); });
    }
    // Every step timed, in both phases (the flags are raised after the sums are added).
    const FabricTimes times = proxy.Times();
    if (ok && (times.dispatch.steps != kSteps || times.combine.steps != kSteps ||
               times.dispatch.post_ns == 0 || times.combine.post_ns == 0)) {
      std::fprintf(stderr, "rank %d: the proxy timed %llu dispatch and %llu combine steps\n",
                   rank, static_cast<unsigned long long>(times.dispatch.steps),
                   static_cast<unsigned long long>(times.combine.steps));
      ok = false;
    }
    // Nobody tears down its proxy while a peer may still expect its credits.
    all_gather({});
  }
  std::printf("rank %d of %d (%d per node): %d steps of dispatch and combine through the proxy, "
              "%s\n", rank, ranks, ranks_per_node, kSteps, ok ? "every byte right" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace jem

int main() {
  setenv("FI_TCP_IFACE", "lo", 0);
  for (const std::pair<int, int>& world : {std::pair{3, 1}, std::pair{4, 2}}) {
    const int ranks = world.first, per_node = world.second;
    const int code = jem::RunForkedRanks(ranks, [&](int rank, const jem::AllGather& gather) {
      return jem::Run(rank, ranks, per_node, gather);
    });
    if (code != 0) return code;
  }
  return 0;
}
