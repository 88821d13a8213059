// The proxy thread of an engine. It alone touches the fabric after setup: it drains the
// submission queue (writes, notifications, control tasks such as registrations), posts
// fi_writemsg with the immediate as remote CQ data, polls every domain's completion queue,
// counts arriving immediates, tracks which send tickets have completed, runs the poll hooks
// installed by the layers above, and records the first fatal error with libfabric's text.
#pragma once

#include <atomic>
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
#include "cc/transfer_engine/backoff.h"
#include "cc/transfer_engine/clock.h"
#include "cc/transfer_engine/fabric_domain.h"
#include "cc/transfer_engine/imm_counter.h"
#include "cc/transfer_engine/peer_group.h"
#include "cc/transfer_engine/reorder_buffer.h"
#include "cc/transfer_engine/split_write.h"
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
  // Starts the thread; domains and counter must outlive the worker.
  ProxyWorker(std::vector<FabricDomain*> domains, ImmCounter* counter,
              const EngineOptions& options);
  ~ProxyWorker();
  ProxyWorker(const ProxyWorker&) = delete;
  ProxyWorker& operator=(const ProxyWorker&) = delete;

  // Any thread. Waits (Backoff) while the queue is full, up to a minute; on the proxy
  // thread itself (a hook, a callback) it never waits: the proxy is the queue's only consumer.
  void Submit(Submission&& s);
  // Runs `fn` on the proxy thread and returns its result or rethrows its exception.
  void RunOnProxy(std::function<void()> fn, double timeout_s);
  bool OnProxyThread() const;

  // Any thread, hooks included. Hooks run in the order they were added.
  uint64_t AddHook(std::function<bool()> hook);
  // Once this returns the hook will not be called again (from the hook itself: after it
  // returns). An id whose hook threw, and was dropped for it, is accepted.
  void RemoveHook(uint64_t id);

  // All tickets up to this one have completed locally.
  SendTicket completed() const { return completed_.load(std::memory_order_acquire); }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::string failure() const;
  // Polls with a Backoff until pred() or the deadline or a failure.
  // Returns pred()'s final value.
  bool PollUntil(const std::function<bool()>& pred, Clock::time_point deadline) const;

 private:
  void Loop();
  bool DrainSubmissions();
  // Posts the current submission's remaining writes; false when the provider said EAGAIN.
  bool PostCurrent();
  // The leading chunks of a write too long for one post (resumed after EAGAIN); 0 or the
  // failed post's return code.
  ssize_t PostLeadingChunks(const Submission& s, const WriteSpec& w, FabricDomain** domain);
  // Last chunks of split writes whose leading chunks have all been delivered.
  bool PostLastChunks();
  bool PollCompletions();
  bool RunHooks();
  std::optional<Submission> NextSubmission();
  // Through the reorder buffer in its test mode, else at once.
  void OnArrival(uint32_t imm);
  void OnWriteCompletion(OpContext* context);
  bool ReleaseHeld();
  void OnWriteCompleted(OpContext* context);
  // Sends in flight, someone waiting on arrivals, or a hook watching memory: the proxy must
  // not sleep.
  bool Active() const;
  // Sleeps up to Backoff::kNap, or until WakeIfSleeping.
  void Nap();
  void WakeIfSleeping();
  void Fail(const std::string& message);
  OpContext* AcquireContext();

  std::vector<FabricDomain*> domains_;
  ImmCounter* counter_;
  EngineOptions options_;
  SubmissionQueue<Submission> queue_;
  // Submissions made on the proxy thread: it cannot wait for room in queue_.
  std::deque<Submission> local_;

  // Proxy-thread state.
  std::optional<Submission> current_;  // a kWrites submission being posted
  size_t current_next_ = 0;            // its next write
  std::deque<int64_t> remaining_;      // writes outstanding per ticket from ticket base_;
  SendTicket base_ = 1;                //   -1: the ticket has not been dequeued yet
  std::vector<std::unique_ptr<OpContext>> contexts_;
  std::vector<OpContext*> free_contexts_;
  std::unique_ptr<ReorderBuffer> reorder_;  // test mode only
  std::unique_ptr<SplitWrite> splitting_;    // current_'s write whose leading chunks are posting
  std::vector<std::unique_ptr<SplitWrite>> splits_;  // leading chunks all posted
  std::deque<SplitWrite*> last_chunks_;              // of splits_: ready to post

  // Poll hooks. The proxy holds hooks_mu_ while it runs them, so a remover that takes it knows
  // none is running; a hook changing the list from inside runs with the lock already held.
  struct PollHook {
    uint64_t id;
    std::function<bool()> fn;
    bool removed = false;
  };
  std::mutex hooks_mu_;
  std::vector<std::unique_ptr<PollHook>> hooks_;
  uint64_t next_hook_id_ = 1;
  std::atomic<size_t> num_hooks_{0};
  bool in_hooks_ = false;  // proxy thread: RunHooks holds hooks_mu_

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
