// A lock-free bounded multi-producer single-consumer ring (Vyukov's bounded queue): user
// threads push work, the proxy thread pops it. Each slot carries a sequence number that says
// whether it is free for the producer of a given position or full for the consumer.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

namespace jem {

template <typename T>
class SubmissionQueue {
 public:
  // capacity must be a power of two.
  explicit SubmissionQueue(size_t capacity)
      : mask_(capacity - 1), slots_(std::make_unique<Slot[]>(capacity)) {
    for (size_t i = 0; i < capacity; ++i) slots_[i].sequence.store(i, std::memory_order_relaxed);
  }

  // Any thread. Returns false (leaving `item` untouched) when the ring is full.
  bool TryPush(T& item) {
    size_t pos = tail_.load(std::memory_order_relaxed);
    for (;;) {
      Slot& slot = slots_[pos & mask_];
      size_t seq = slot.sequence.load(std::memory_order_acquire);
      intptr_t diff = static_cast<intptr_t>(seq) - static_cast<intptr_t>(pos);
      if (diff == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          slot.value = std::move(item);
          slot.sequence.store(pos + 1, std::memory_order_release);
          return true;
        }
      } else if (diff < 0) {
        return false;
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
  }

  // The single consumer only.
  bool Empty() const {
    size_t seq = slots_[head_ & mask_].sequence.load(std::memory_order_acquire);
    return static_cast<intptr_t>(seq) - static_cast<intptr_t>(head_ + 1) < 0;
  }

  // The single consumer only.
  std::optional<T> TryPop() {
    Slot& slot = slots_[head_ & mask_];
    size_t seq = slot.sequence.load(std::memory_order_acquire);
    if (static_cast<intptr_t>(seq) - static_cast<intptr_t>(head_ + 1) < 0) return std::nullopt;
    std::optional<T> out(std::move(slot.value));
    slot.value = T();
    slot.sequence.store(head_ + mask_ + 1, std::memory_order_release);
    ++head_;
    return out;
  }

 private:
  struct Slot {
    std::atomic<size_t> sequence;
    T value;
  };
  const size_t mask_;
  std::unique_ptr<Slot[]> slots_;
  alignas(64) std::atomic<size_t> tail_{0};
  alignas(64) size_t head_ = 0;
};

}  // namespace jem
