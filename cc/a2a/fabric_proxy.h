// The proxy side of the GPU path for peers on other nodes (DESIGN §6). A GPU cannot post
// fabric work on EFA, so the kernels publish step numbers and per-peer counts in a mailbox of
// mapped host memory, and this protocol, run as a poll hook on the TransferEngine's proxy
// thread, turns them into RDMA writes with immediates; it counts the immediates that arrive
// and releases the receiving kernels by raising their flags in mapped host memory.
//
// Per phase and step, in order:
//   dispatch_sent  -> to every fabric peer d: route row, slot ranks [n][k], records [n]
//                     (three writes, imm kDispatchData) from the outbox for d into this
//                     rank's slot of d's fabric buffer
//   3 x F arrivals of kDispatchData -> dispatch_ready[s] = SignalOf(step) for every fabric
//                     sender s
//   dispatch_read  -> a zero-length kDispatchCredit write to every fabric peer
//   F arrivals of kDispatchCredit -> dispatch_credit[d] = SignalOf(step) for every fabric
//                     peer d
// and combine the same way (one kCombineData write of n partial rows per home rank).
// F is the number of fabric peers. Writes are not ordered (EFA), so only counts matter, and a
// zero-length write still carries its immediate, so every expected count is fixed.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "cc/base/layout.h"
#include "cc/base/nvlink_layout.h"
#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/clock.h"

namespace jem {

// Where one phase's fabric steps spent their time on this rank, summed over steps, on the
// proxy thread's clock. A wait counts from this rank's own event to the last arrival, so a
// peer that is late shows up here as waiting.
struct FabricPhaseTimes {
  uint64_t steps = 0;           // steps whose credits from every fabric peer arrived
  uint64_t post_ns = 0;         // submitting the step's writes (the mailbox was seen)
  uint64_t data_wait_ns = 0;    // writes submitted -> every fabric peer's data counted
  uint64_t credit_wait_ns = 0;  // this rank's credit sent -> every fabric peer's counted
};

struct FabricTimes {
  FabricPhaseTimes dispatch, combine;
};

class FabricProxy {
 public:
  // `region`: the fabric buffer's registration with `engine` (laid out like the arena);
  // `mailbox` and `signals` (laid out like the arena's signals region): host memory the GPU
  // maps. `peers[r]` is fabric peer r's address and fabric buffer (unused for other ranks).
  // Starts serving at once.
  FabricProxy(TransferEngine& engine, const Layout& layout, int rank, uint64_t fabric_mask,
              MemoryRegionId region, ProxyMailbox* mailbox, uint8_t* signals,
              const std::vector<PeerSpec>& peers);
  // Returns once the proxy thread has stopped serving this rank.
  ~FabricProxy();
  FabricProxy(const FabricProxy&) = delete;
  FabricProxy& operator=(const FabricProxy&) = delete;

  // Any thread; the sums so far.
  FabricTimes Times() const;

 private:
  struct Phase {
    uint64_t posted = 0;    // steps whose data went out
    uint64_t landed = 0;    // steps whose data from every fabric peer arrived
    uint64_t credited = 0;  // steps whose credit went out
    uint64_t freed = 0;     // steps whose credit from every fabric peer arrived
    Clock::time_point posted_at, credited_at;  // of the last step posted, credited
    // Written by the proxy thread only, read by Times().
    std::atomic<uint64_t> steps{0}, post_ns{0}, data_wait_ns{0}, credit_wait_ns{0};

    FabricPhaseTimes Sums() const;
  };

  bool Poll();
  bool PostDispatch(uint64_t step);
  bool PostCombine(uint64_t step);
  // Raises flag `offset_of(peer)` of every fabric peer to SignalOf(step) in the signals region.
  template <typename OffsetOf>
  void Release(OffsetOf offset_of, uint64_t step);
  // Steps of one phase: data out, data in, credit out, credit in.
  bool Advance(Phase& phase, const uint64_t* sent, const uint64_t* read, ImmKind data,
               uint32_t data_writes, ImmKind credit, bool (FabricProxy::*post)(uint64_t),
               int64_t (NvlinkLayout::*ready_offset)(int64_t) const,
               int64_t (NvlinkLayout::*credit_offset)(int64_t) const);

  TransferEngine& engine_;
  NvlinkLayout nl_;
  int rank_;
  std::vector<int> fabric_ranks_;  // in rank order; index = peer index in group_
  ProxyMailbox* mailbox_;
  uint8_t* signals_;
  PeerGroupId group_;
  Phase dispatch_, combine_;
  std::vector<WriteSpec> writes_;  // reused by every post
  uint64_t hook_ = 0;
};

}  // namespace jem
