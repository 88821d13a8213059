// Arrivals of remote writes counted per 32-bit immediate value. Writes are not ordered (EFA
// does not order them), so completion is known only by counting: arrivals may come before
// anyone waits, and a wait consumes what it asked for so that a value can be reused. Entries
// that drop to zero are erased, so the map holds only values with unconsumed arrivals.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <unordered_map>

#include "cc/transfer_engine/clock.h"

namespace jem {

class ImmCounter {
 public:
  // A release to perform when `count` arrivals have been seen: store `value` to *flag with
  // release order, or call callback(arg).
  struct Notification {
    uint32_t count = 0;
    volatile uint32_t* flag = nullptr;
    uint32_t value = 0;
    void (*callback)(void*) = nullptr;
    void* arg = nullptr;
  };

  // Proxy thread: one more arrival of `imm`; fires the notifications it satisfies, in order.
  void Arrive(uint32_t imm);
  // Proxy thread: fires now if already satisfied, otherwise once enough arrivals come.
  void AddNotification(uint32_t imm, const Notification& n);

  // Any thread: consumes `count` arrivals of `imm` if present. `generation` receives the
  // arrival generation seen, for WaitForArrival.
  bool TryConsume(uint32_t imm, uint32_t count, uint64_t* generation);
  // Blocks until an arrival after `generation`, Wake(), or `until`.
  void WaitForArrival(uint64_t generation, Clock::time_point until);
  // Wakes every blocked waiter (the engine failed or stopped).
  void Wake();
  uint64_t Pending(uint32_t imm);

  // Whether someone waits for arrivals (the proxy then polls without sleeping).
  bool HasWaiters() const {
    return waiters_.load(std::memory_order_relaxed) > 0 ||
           notifications_.load(std::memory_order_relaxed) > 0;
  }
  // RAII marker of a thread waiting in WaitImm.
  class Waiter {
   public:
    explicit Waiter(ImmCounter* c) : c_(c) { c_->waiters_.fetch_add(1); }
    ~Waiter() { c_->waiters_.fetch_sub(1); }

   private:
    ImmCounter* c_;
  };

 private:
  static void Fire(const Notification& n);

  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int sleepers_ = 0;
  std::unordered_map<uint32_t, uint64_t> counts_;
  std::unordered_map<uint32_t, std::deque<Notification>> pending_;
  std::atomic<int> waiters_{0};
  std::atomic<int> notifications_{0};
};

}  // namespace jem
