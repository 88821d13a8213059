// How a host thread waits for the proxy, the NIC or a peer: spin while an answer usually comes
// within microseconds, then yield the core, then sleep. Ranks often outnumber cores (8 ranks
// on 2 in CI), so a wait that outlasts the spin must give the CPU away; with busy_poll (a core
// per engine) it spins throughout, for the lowest latency.
#pragma once

#include <sched.h>

#include <chrono>
#include <thread>

#include "cc/transfer_engine/clock.h"

namespace jem {

class Backoff {
 public:
  // A proxy turn or a loopback round trip: answered without a context switch.
  static constexpr auto kSpinFor = std::chrono::microseconds(20);
  // Then yield up to here: ranks sharing the core run, and the wait still answers within a
  // scheduler turn.
  static constexpr auto kYieldUntil = std::chrono::microseconds(1000);
  // Then sleep this long between polls: a long wait costs little CPU and at most this much
  // latency (less where a condition variable wakes the sleeper).
  static constexpr auto kNap = std::chrono::microseconds(100);

  explicit Backoff(bool busy_poll, Clock::time_point start = Clock::now())
      : busy_poll_(busy_poll), start_(start) {}

  // Progress was made: the wait starts over with spinning.
  void Restart(Clock::time_point now) { start_ = now; }

  // Spins or yields once and returns true while the wait (since construction or Restart) is
  // younger than kYieldUntil; returns false at once after that, and the caller sleeps on
  // what wakes it.
  bool SpinOrYield(Clock::time_point now) const {
    if (busy_poll_ || now - start_ < kSpinFor) {
      CpuRelax();
    } else if (now - start_ < kYieldUntil) {
      sched_yield();
    } else {
      return false;
    }
    return true;
  }

  // SpinOrYield, or a nap when nothing wakes the caller sooner.
  void Pause(Clock::time_point now) const {
    if (!SpinOrYield(now)) std::this_thread::sleep_for(kNap);
  }

 private:
  static void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  bool busy_poll_;
  Clock::time_point start_;
};

}  // namespace jem
