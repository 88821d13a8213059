// One rank's all-to-all state: the layout, its own TransferEngine, the arena (allocated and
// registered once), the peer group over every other rank's arena, the step sequence numbers,
// what a send half leaves for its recv half, and the first failure.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cc/a2a/errors.h"
#include "cc/base/layout.h"
#include "cc/base/plan.h"
#include "cc/transfer_engine/api.h"

namespace jem {

// "2.5 s", for messages.
std::string FormatSeconds(double seconds);

// Where one phase (dispatch or combine) stands: steps completed (the immediates carry its low
// 28 bits) and whether the send half has run without its recv half.
struct PhaseState {
  const char* name;  // "dispatch" or "combine"
  uint64_t steps = 0;
  bool pending = false;
};

enum class Half { kSend, kRecv };

class AllToAllContext {
 public:
  // Creates the engine, allocates and registers the arena. Throws Error when the provider is
  // missing or the layout is inconsistent.
  AllToAllContext(const EngineOptions& engine_options, const Layout& layout, int rank,
                  double timeout_s);
  ~AllToAllContext();
  AllToAllContext(const AllToAllContext&) = delete;
  AllToAllContext& operator=(const AllToAllContext&) = delete;

  // What the other ranks need to reach this one: the engine's address and the arena's
  // remote descriptor.
  Bytes Address() const { return engine_->Address(); }
  Bytes ArenaDescriptor() const { return engine_->Descriptor(region_); }
  // Joins the other ranks; `ranks` holds every rank in order, this rank's own entry unused.
  void Connect(const std::vector<PeerSpec>& ranks);

  const Layout& layout() const { return layout_; }
  int rank() const { return rank_; }
  double timeout_s() const { return timeout_s_; }
  uint8_t* arena() { return arena_; }
  RouteTable route() const {
    return RouteTable{reinterpret_cast<const int32_t*>(arena_ + layout_.route_offset()), layout_};
  }
  int32_t* route_row(int sender) {
    return reinterpret_cast<int32_t*>(arena_ + layout_.route_row_offset(sender));
  }
  // Index of `rank` in the peer group (every rank but this one, in rank order).
  uint32_t PeerIndex(int rank) const {
    return static_cast<uint32_t>(rank < rank_ ? rank : rank - 1);
  }

  PhaseState dispatch{"dispatch"};
  PhaseState combine{"combine"};

  // Steps run one at a time per context.
  std::mutex& step_mutex() { return step_mutex_; }

  // Waits for `count` arrivals of MakeImm(kind, seq) within timeout_s; a timeout says what was
  // awaited.
  void WaitArrivals(ImmKind kind, uint32_t seq, uint32_t count, const std::string& what);

  // Writes to peers, each carrying MakeImm(kind, seq); Barrier: one empty write to every peer.
  // WaitAllSent returns once the source bytes of every write so far may be reused.
  void Scatter(const std::vector<WriteSpec>& writes, ImmKind kind, uint32_t seq) {
    tickets_.push_back(engine_->Scatter(peers_, writes.data(), writes.size(), MakeImm(kind, seq)));
  }
  void Barrier(ImmKind kind, uint32_t seq) {
    tickets_.push_back(engine_->Barrier(peers_, MakeImm(kind, seq)));
  }
  void WaitAllSent();

  // Throws ContextUnusable unless Connect has run and no step has failed.
  void CheckUsable() const;
  // Keeps the first failure; every later step fails at once with it.
  void Fail(const std::string& message);

 private:
  Layout layout_;
  int rank_;
  double timeout_s_;
  std::unique_ptr<TransferEngine> engine_;
  uint8_t* arena_ = nullptr;
  MemoryRegionId region_;
  PeerGroupId peers_;
  bool connected_ = false;
  std::vector<SendTicket> tickets_;
  std::mutex step_mutex_;
  mutable std::mutex failure_mutex_;
  std::string failure_;
};

// Runs one half of `phase` as a step of the protocol: one at a time per context, refused after
// a failure or out of order (a send half twice, a recv half without its send half), and any
// error marks the context failed and is prefixed with the half's name. body(seq) gets the
// step's sequence number; once it returns, the phase moves on (a recv half ends the step).
template <typename Body>
void RunHalf(AllToAllContext& ctx, PhaseState& phase, Half half, Body&& body) {
  std::lock_guard<std::mutex> lock(ctx.step_mutex());
  ctx.CheckUsable();
  const std::string name = phase.name;
  const bool send = half == Half::kSend;
  const std::string prefix = name + (send ? "_send: " : "_recv: ");
  try {
    if (send && phase.pending) {
      throw InputError("called twice without " + name + "_recv in between; each " + name +
                       "_send must be followed by its " + name + "_recv.");
    }
    if (!send && !phase.pending) throw InputError("called without a " + name + "_send before it.");
    body(static_cast<uint32_t>(phase.steps));
  } catch (const InputError& e) {
    ctx.Fail(prefix + e.what());
    throw InputError(prefix + e.what());
  } catch (const TimeoutError& e) {
    ctx.Fail(prefix + e.what());
    throw TimeoutError(prefix + e.what());
  } catch (const std::exception& e) {
    ctx.Fail(prefix + e.what());
    throw Error(prefix + e.what());
  }
  phase.pending = send;
  if (!send) ++phase.steps;
}

}  // namespace jem
