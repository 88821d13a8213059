#include "cc/transfer_engine/imm_counter.h"

#include <vector>

namespace jem {

void ImmCounter::Fire(const Notification& n) {
  if (n.flag) {
    __atomic_store_n(const_cast<uint32_t*>(n.flag), n.value, __ATOMIC_RELEASE);
  } else if (n.callback) {
    n.callback(n.arg);
  }
}

void ImmCounter::Arrive(uint32_t imm) {
  std::vector<Notification> ready;
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t& count = counts_[imm];
    ++count;
    ++generation_;
    auto it = pending_.find(imm);
    if (it != pending_.end()) {
      auto& queue = it->second;
      while (!queue.empty() && queue.front().count <= count) {
        count -= queue.front().count;
        ready.push_back(queue.front());
        queue.pop_front();
      }
      if (queue.empty()) pending_.erase(it);
    }
    if (count == 0) counts_.erase(imm);
    wake = sleepers_ > 0;
  }
  notifications_.fetch_sub(static_cast<int>(ready.size()), std::memory_order_relaxed);
  if (wake) cv_.notify_all();
  for (const auto& n : ready) Fire(n);
}

void ImmCounter::AddNotification(uint32_t imm, const Notification& n) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = counts_.find(imm);
    bool queued_before = pending_.count(imm) > 0;
    if (queued_before || n.count > (it == counts_.end() ? 0 : it->second)) {
      pending_[imm].push_back(n);
      notifications_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    if (n.count > 0) {
      it->second -= n.count;
      if (it->second == 0) counts_.erase(it);
    }
  }
  Fire(n);
}

bool ImmCounter::TryConsume(uint32_t imm, uint32_t count, uint64_t* generation) {
  std::lock_guard<std::mutex> lock(mu_);
  *generation = generation_;
  if (count == 0) return true;
  auto it = counts_.find(imm);
  if (it == counts_.end() || it->second < count) return false;
  it->second -= count;
  if (it->second == 0) counts_.erase(it);
  return true;
}

void ImmCounter::WaitForArrival(uint64_t generation, Clock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  ++sleepers_;
  cv_.wait_until(lock, until, [&] { return generation_ != generation; });
  --sleepers_;
}

void ImmCounter::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++generation_;
  }
  cv_.notify_all();
}

uint64_t ImmCounter::Pending(uint32_t imm) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = counts_.find(imm);
  return it == counts_.end() ? 0 : it->second;
}

}  // namespace jem
