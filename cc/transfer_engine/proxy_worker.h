// The proxy thread of an engine. It alone touches the fabric after setup: it drains the
// submission queue (writes, notifications, control tasks such as registrations), posts
// fi_writemsg with the immediate as remote CQ data, polls every domain's completion queue,
// counts arriving immediates, tracks which send tickets have completed, and records the
// first fatal error with libfabric's text.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/fabric_domain.h"
#include "cc/transfer_engine/imm_counter.h"
#include "cc/transfer_engine/peer_group.h"
#include "cc/transfer_engine/submission_queue.h"

namespace jem {

struct Submission {
  enum class Kind : uint8_t { kNone, kWrites, kNotify, kControl };
  Kind kind = Kind::kNone;
  // kWrites: every write of the ticket carries `imm`.
  SendTicket ticket = 0;
  PeerGroup* group = nullptr;
  std::vector<WriteSpec> writes;
  uint32_t imm = 0;
  // kNotify (with imm).
  ImmCounter::Notification notification;
  // kControl: runs on the proxy thread.
  std::function<void()> control;
};

class ProxyWorker {
 public:
  using Clock = std::chrono::steady_clock;

  // Starts the thread; domains and counter must outlive the worker.
  ProxyWorker(std::vector<FabricDomain*> domains, ImmCounter* counter,
              const EngineOptions& options);
  ~ProxyWorker();
  ProxyWorker(const ProxyWorker&) = delete;
  ProxyWorker& operator=(const ProxyWorker&) = delete;

  // Any thread. Waits (yielding) while the queue is full.
  void Submit(Submission&& s);
  // Runs `fn` on the proxy thread and returns its result or rethrows its exception.
  void RunOnProxy(std::function<void()> fn, double timeout_s);

  // All tickets up to this one have completed locally.
  SendTicket completed() const { return completed_.load(std::memory_order_acquire); }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::string failure() const;
  // Polls (spin, then yield, then sleep) until pred() or the deadline or a failure.
  // Returns pred()'s final value.
  bool PollUntil(const std::function<bool()>& pred, Clock::time_point deadline) const;

 private:
  void Loop();
  bool DrainSubmissions();
  // Posts the current submission's remaining writes; false when the provider said EAGAIN.
  bool PostCurrent();
  bool PollCompletions();
  void OnWriteCompleted(OpContext* context);
  void Idle(Clock::duration idle_for);
  void Fail(const std::string& message);
  OpContext* AcquireContext();

  std::vector<FabricDomain*> domains_;
  ImmCounter* counter_;
  EngineOptions options_;
  SubmissionQueue<Submission> queue_;

  // Proxy-thread state.
  std::optional<Submission> current_;  // a kWrites submission being posted
  size_t current_next_ = 0;            // its next write
  std::deque<int64_t> remaining_;      // writes outstanding per ticket from ticket base_;
  SendTicket base_ = 1;                //   -1: the ticket has not been dequeued yet
  std::vector<std::unique_ptr<OpContext>> contexts_;
  std::vector<OpContext*> free_contexts_;

  std::atomic<SendTicket> completed_{0};
  std::atomic<bool> failed_{false};
  mutable std::mutex failure_mu_;
  std::string failure_;

  // Sleeping proxy, woken by Submit.
  std::atomic<bool> stop_{false};
  std::atomic<bool> sleeping_{false};
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::thread thread_;
};

}  // namespace jem
