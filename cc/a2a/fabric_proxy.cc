#include "cc/a2a/fabric_proxy.h"

#include <string>

namespace jem {
namespace {

constexpr uint32_t kWritesPerDispatch = 3;  // route row, slot ranks, records
constexpr uint32_t kWritesPerCombine = 1;   // partial rows

uint64_t LoadAcquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

int32_t LoadCount(const int32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

// Adds `ns` to a sum only the proxy thread writes.
void Add(std::atomic<uint64_t>& sum, int64_t ns) {
  sum.store(sum.load(std::memory_order_relaxed) + static_cast<uint64_t>(ns > 0 ? ns : 0),
            std::memory_order_relaxed);
}

int64_t Ns(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}

}  // namespace

FabricProxy::FabricProxy(TransferEngine& engine, const Layout& layout, int rank,
                         uint64_t fabric_mask, MemoryRegionId region, ProxyMailbox* mailbox,
                         uint8_t* signals, const std::vector<PeerSpec>& peers)
    : engine_(engine), nl_{layout}, rank_(rank), mailbox_(mailbox), signals_(signals) {
  std::vector<PeerSpec> specs;
  for (int r = 0; r < layout.num_ranks; ++r) {
    if ((fabric_mask >> r) & 1) {
      if (r == rank) throw Error("a rank cannot be its own fabric peer.");
      fabric_ranks_.push_back(r);
      specs.push_back(peers.at(r));
    }
  }
  if (fabric_ranks_.empty()) throw Error("a fabric proxy needs at least one fabric peer.");
  group_ = engine_.AddPeerGroup(region, specs);
  writes_.reserve(kWritesPerDispatch * fabric_ranks_.size());
  hook_ = engine_.AddPollHook([this] { return Poll(); });
}

FabricProxy::~FabricProxy() { engine_.RemovePollHook(hook_); }

FabricPhaseTimes FabricProxy::Phase::Sums() const {
  FabricPhaseTimes t;
  t.steps = steps.load(std::memory_order_relaxed);
  t.post_ns = post_ns.load(std::memory_order_relaxed);
  t.data_wait_ns = data_wait_ns.load(std::memory_order_relaxed);
  t.credit_wait_ns = credit_wait_ns.load(std::memory_order_relaxed);
  return t;
}

FabricTimes FabricProxy::Times() const { return {dispatch_.Sums(), combine_.Sums()}; }

bool FabricProxy::Poll() {
  bool worked = Advance(dispatch_, &mailbox_->dispatch_sent, &mailbox_->dispatch_read,
                        ImmKind::kDispatchData, kWritesPerDispatch, ImmKind::kDispatchCredit,
                        &FabricProxy::PostDispatch, &NvlinkLayout::dispatch_ready_offset,
                        &NvlinkLayout::dispatch_credit_offset);
  worked |= Advance(combine_, &mailbox_->combine_sent, &mailbox_->combine_read,
                    ImmKind::kCombineData, kWritesPerCombine, ImmKind::kCombineCredit,
                    &FabricProxy::PostCombine, &NvlinkLayout::combine_ready_offset,
                    &NvlinkLayout::combine_credit_offset);
  return worked;
}

bool FabricProxy::Advance(Phase& phase, const uint64_t* sent, const uint64_t* read,
                          ImmKind data, uint32_t data_writes, ImmKind credit,
                          bool (FabricProxy::*post)(uint64_t),
                          int64_t (NvlinkLayout::*ready_offset)(int64_t) const,
                          int64_t (NvlinkLayout::*credit_offset)(int64_t) const) {
  const uint32_t F = static_cast<uint32_t>(fabric_ranks_.size());
  bool worked = false;
  // A send kernel cannot run ahead: it waits for the credits of the previous step, which
  // need this rank's writes of that step. So the mailbox moves one step at a time.
  // A wait that ends before this rank's own event of that step (peers ahead) counts as none.
  if (LoadAcquire(sent) > phase.posted) {
    const Clock::time_point start = Clock::now();
    worked |= (this->*post)(++phase.posted);
    phase.posted_at = Clock::now();
    Add(phase.post_ns, Ns(phase.posted_at - start));
  }
  if (engine_.TryConsumeImm(MakeImm(data, static_cast<uint32_t>(phase.landed + 1)),
                            data_writes * F)) {
    // Timed before the release, so that whoever sees the flags sees the sums too.
    if (++phase.landed == phase.posted) {
      Add(phase.data_wait_ns, Ns(Clock::now() - phase.posted_at));
    }
    Release([&](int peer) { return (nl_.*ready_offset)(peer); }, phase.landed);
    worked = true;
  }
  if (LoadAcquire(read) > phase.credited) {
    engine_.Barrier(group_, MakeImm(credit, static_cast<uint32_t>(++phase.credited)));
    phase.credited_at = Clock::now();
    worked = true;
  }
  if (engine_.TryConsumeImm(MakeImm(credit, static_cast<uint32_t>(phase.freed + 1)), F)) {
    if (++phase.freed == phase.credited) {
      Add(phase.credit_wait_ns, Ns(Clock::now() - phase.credited_at));
    }
    Add(phase.steps, 1);
    Release([&](int peer) { return (nl_.*credit_offset)(peer); }, phase.freed);
    worked = true;
  }
  return worked;
}

bool FabricProxy::PostDispatch(uint64_t step) {
  const Layout& l = nl_.layout;
  writes_.clear();
  for (uint32_t i = 0; i < fabric_ranks_.size(); ++i) {
    const int d = fabric_ranks_[i];
    const uint64_t n = static_cast<uint64_t>(LoadCount(&mailbox_->dispatch_counts[d]));
    writes_.push_back({i, uint64_t(nl_.outbox_route_offset(d)),
                       uint64_t(nl_.route_row_offset(rank_)),
                       uint64_t(nl_.route_row_ints() * 4)});
    writes_.push_back({i, uint64_t(nl_.outbox_slot_rank_offset(d, 0)),
                       uint64_t(nl_.slot_rank_record_offset(rank_, 0)),
                       n * l.experts_per_token * 4});
    writes_.push_back({i, uint64_t(nl_.outbox_record_offset(d, 0)),
                       uint64_t(nl_.record_offset(rank_, 0)), n * l.record_bytes()});
  }
  engine_.Scatter(group_, writes_.data(), writes_.size(),
                  MakeImm(ImmKind::kDispatchData, static_cast<uint32_t>(step)));
  return true;
}

bool FabricProxy::PostCombine(uint64_t step) {
  writes_.clear();
  for (uint32_t i = 0; i < fabric_ranks_.size(); ++i) {
    const int home = fabric_ranks_[i];
    const uint64_t n = static_cast<uint64_t>(LoadCount(&mailbox_->combine_counts[home]));
    writes_.push_back({i, uint64_t(nl_.combine_outbox_offset(home, 0)),
                       uint64_t(nl_.partial_offset(rank_, 0)),
                       n * nl_.layout.combine_row_bytes()});
  }
  engine_.Scatter(group_, writes_.data(), writes_.size(),
                  MakeImm(ImmKind::kCombineData, static_cast<uint32_t>(step)));
  return true;
}

template <typename OffsetOf>
void FabricProxy::Release(OffsetOf offset_of, uint64_t step) {
  for (int peer : fabric_ranks_) {
    __atomic_store_n(reinterpret_cast<uint64_t*>(signals_ + offset_of(peer)), SignalOf(step),
                     __ATOMIC_RELEASE);
  }
}

}  // namespace jem
