#include "cc/transfer_engine/reorder_buffer.h"

#include <algorithm>

namespace jem {
namespace {

// Bounds that keep reordered tests fast: no event waits longer than kMaxDelay, and beyond
// kMaxHeld held events a random one is released at once.
constexpr auto kMaxDelay = std::chrono::microseconds(200);
constexpr size_t kMaxHeld = 48;

}  // namespace

void ReorderBuffer::Hold(const Event& event, Clock::time_point now) {
  auto delay = std::chrono::nanoseconds(rng_() % (std::chrono::nanoseconds(kMaxDelay).count() + 1));
  held_.push_back({event, now + delay});
  if (held_.size() > kMaxHeld) held_[rng_() % held_.size()].due = now;
}

const std::vector<ReorderBuffer::Event>& ReorderBuffer::Release(Clock::time_point now) {
  due_.clear();
  for (size_t i = 0; i < held_.size();) {
    if (held_[i].due <= now) {
      due_.push_back(held_[i].event);
      held_[i] = held_.back();
      held_.pop_back();
    } else {
      ++i;
    }
  }
  std::shuffle(due_.begin(), due_.end(), rng_);
  return due_;
}

}  // namespace jem
