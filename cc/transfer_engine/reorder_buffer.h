// Test mode (EngineOptions::reorder_seed): the proxy holds back arriving immediates and local
// write completions and releases them in a seeded random order after short random delays, as
// EFA, which does not order writes, may deliver them. Holding an arrival back is safe: the
// bytes of a write have landed before its immediate is counted.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "cc/transfer_engine/clock.h"
#include "cc/transfer_engine/fabric_domain.h"

namespace jem {

class ReorderBuffer {
 public:
  // An arrival of `imm` (context == nullptr) or the local completion of `context`'s write.
  struct Event {
    uint32_t imm = 0;
    OpContext* context = nullptr;
  };

  explicit ReorderBuffer(uint64_t seed) : rng_(seed) {}

  void Hold(const Event& event, Clock::time_point now);
  // The events due at `now`, in random order; the vector is reused by the next call.
  const std::vector<Event>& Release(Clock::time_point now);
  bool empty() const { return held_.empty(); }

 private:
  struct Held {
    Event event;
    Clock::time_point due;
  };

  std::mt19937_64 rng_;
  std::vector<Held> held_;
  std::vector<Event> due_;
};

}  // namespace jem
