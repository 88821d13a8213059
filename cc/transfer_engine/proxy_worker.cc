#include "cc/transfer_engine/proxy_worker.h"

#include <pthread.h>
#include <rdma/fi_errno.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <future>

namespace jem {
namespace {

constexpr size_t kQueueCapacity = 4096;
constexpr size_t kCompletionsPerPoll = 64;
constexpr size_t kSubmissionsPerDrain = 64;
// Submit gives up when the queue stays full this long (the proxy cannot post).
constexpr auto kFullQueueTimeout = std::chrono::seconds(60);

// The worker whose Loop runs on this thread, if any.
thread_local const ProxyWorker* tls_proxy = nullptr;

}  // namespace

ProxyWorker::ProxyWorker(std::vector<FabricDomain*> domains, ImmCounter* counter,
                         const EngineOptions& options)
    : domains_(std::move(domains)), counter_(counter), options_(options),
      queue_(kQueueCapacity) {
  if (options_.reorder_seed != 0) reorder_ = std::make_unique<ReorderBuffer>(options_.reorder_seed);
  if (options_.pin_cpu >= CPU_SETSIZE) {
    throw Error("cannot pin the proxy thread to CPU " + std::to_string(options_.pin_cpu) +
                ": no such CPU");
  }
  thread_ = std::thread([this] { Loop(); });
  if (options_.pin_cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(options_.pin_cpu, &set);
    int rc = pthread_setaffinity_np(thread_.native_handle(), sizeof set, &set);
    if (rc != 0) {
      stop_ = true;
      thread_.join();
      throw Error("cannot pin the proxy thread to CPU " + std::to_string(options_.pin_cpu) +
                  ": " + std::strerror(rc));
    }
  }
}

ProxyWorker::~ProxyWorker() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
  }
  sleep_cv_.notify_one();
  thread_.join();
  counter_->Wake();
}

bool ProxyWorker::OnProxyThread() const { return tls_proxy == this; }

void ProxyWorker::Submit(Submission&& s) {
  if (OnProxyThread()) {
    local_.push_back(std::move(s));
    return;
  }
  if (!queue_.TryPush(s)) {
    const Backoff backoff(options_.busy_poll);
    const auto deadline = Clock::now() + kFullQueueTimeout;
    while (!queue_.TryPush(s)) {
      if (stop_.load(std::memory_order_relaxed)) throw Error("the engine is shutting down");
      const auto now = Clock::now();
      if (now > deadline) {
        throw Error("the proxy accepted no work for " +
                    std::to_string(kFullQueueTimeout.count()) +
                    " s: its posts are not completing (a peer may be dead or stalled)" +
                    (failed() ? ": " + failure() : std::string()));
      }
      backoff.Pause(now);
    }
  }
  WakeIfSleeping();
}

void ProxyWorker::WakeIfSleeping() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    sleep_cv_.notify_one();
  }
}

void ProxyWorker::RunOnProxy(std::function<void()> fn, double timeout_s) {
  if (OnProxyThread()) {  // queued, it would wait for the thread that waits for it
    fn();
    return;
  }
  auto task = std::make_shared<std::packaged_task<void()>>(std::move(fn));
  std::future<void> done = task->get_future();
  Submission s;
  s.kind = Submission::Kind::kControl;
  s.control = [task] { (*task)(); };
  Submit(std::move(s));
  if (done.wait_for(std::chrono::duration<double>(timeout_s)) != std::future_status::ready) {
    // The task still references caller state; the proxy is wedged, nothing is safe now.
    throw Error("the proxy thread did not run a setup task within " +
                std::to_string(timeout_s) + " s" +
                (failed() ? ": " + failure() : std::string()));
  }
  done.get();
}

std::string ProxyWorker::failure() const {
  std::lock_guard<std::mutex> lock(failure_mu_);
  return failure_;
}

void ProxyWorker::Fail(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(failure_mu_);
    if (!failure_.empty()) return;
    failure_ = message;
  }
  failed_.store(true, std::memory_order_release);
  counter_->Wake();
}

bool ProxyWorker::PollUntil(const std::function<bool()>& pred, Clock::time_point deadline) const {
  const Backoff backoff(options_.busy_poll);
  for (;;) {
    if (pred()) return true;
    if (failed()) return false;
    auto now = Clock::now();
    if (now >= deadline) return false;
    backoff.Pause(now);
  }
}

OpContext* ProxyWorker::AcquireContext() {
  if (free_contexts_.empty()) {
    contexts_.push_back(std::make_unique<OpContext>());
    return contexts_.back().get();
  }
  OpContext* c = free_contexts_.back();
  free_contexts_.pop_back();
  return c;
}

uint64_t ProxyWorker::AddHook(std::function<bool()> hook) {
  std::unique_lock<std::mutex> lock(hooks_mu_, std::defer_lock);
  if (!(OnProxyThread() && in_hooks_)) lock.lock();
  uint64_t id = next_hook_id_++;
  hooks_.push_back(std::make_unique<PollHook>(PollHook{id, std::move(hook)}));
  num_hooks_.store(hooks_.size(), std::memory_order_release);
  if (lock.owns_lock()) lock.unlock();
  WakeIfSleeping();
  return id;
}

void ProxyWorker::RemoveHook(uint64_t id) {
  std::unique_lock<std::mutex> lock(hooks_mu_, std::defer_lock);
  bool from_hook = OnProxyThread() && in_hooks_;
  if (!from_hook) lock.lock();
  if (id == 0 || id >= next_hook_id_) throw Error("unknown poll hook " + std::to_string(id));
  for (auto it = hooks_.begin(); it != hooks_.end(); ++it) {
    if ((*it)->id != id) continue;
    if (from_hook) {
      (*it)->removed = true;  // RunHooks is iterating; it erases the hook when done
    } else {
      hooks_.erase(it);
      num_hooks_.store(hooks_.size(), std::memory_order_release);
    }
    return;
  }
}

bool ProxyWorker::RunHooks() {
  if (num_hooks_.load(std::memory_order_acquire) == 0) return false;
  std::lock_guard<std::mutex> lock(hooks_mu_);
  in_hooks_ = true;
  bool worked = false;
  // By index: a hook may add hooks, which moves the pointers but not the hooks.
  for (size_t i = 0; i < hooks_.size(); ++i) {
    PollHook* hook = hooks_[i].get();
    if (hook->removed) continue;
    try {
      worked |= hook->fn();
    } catch (const std::exception& e) {
      hook->removed = true;  // it would throw again at the next turn
      Fail("poll hook " + std::to_string(hook->id) + " threw: " + e.what());
    } catch (...) {
      hook->removed = true;
      Fail("poll hook " + std::to_string(hook->id) + " threw a non-standard exception");
    }
  }
  in_hooks_ = false;
  hooks_.erase(std::remove_if(hooks_.begin(), hooks_.end(),
                              [](const std::unique_ptr<PollHook>& h) { return h->removed; }),
               hooks_.end());
  num_hooks_.store(hooks_.size(), std::memory_order_release);
  return worked;
}

void ProxyWorker::Loop() {
  tls_proxy = this;
  Backoff idle(options_.busy_poll);
  while (!stop_.load(std::memory_order_relaxed)) {
    bool worked = RunHooks();
    if (current_) {
      worked |= PostCurrent();
    } else {
      worked |= DrainSubmissions();
    }
    worked |= PollCompletions();
    worked |= ReleaseHeld();
    if (!last_chunks_.empty()) worked |= PostLastChunks();
    auto now = Clock::now();
    if (worked) {
      idle.Restart(now);
    } else if (!options_.busy_poll && Active()) {
      // Keep polling, but let other ranks sharing this core run in between.
      sched_yield();
    } else if (!idle.SpinOrYield(now)) {
      Nap();
    }
  }
}

bool ProxyWorker::Active() const {
  return !remaining_.empty() || current_ || counter_->HasWaiters() ||
         num_hooks_.load(std::memory_order_relaxed) > 0 || (reorder_ && !reorder_->empty());
}

void ProxyWorker::Nap() {
  std::unique_lock<std::mutex> lock(sleep_mu_);
  sleeping_.store(true, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // Bounded even without a wake: incoming writes need CQ polling to make progress too.
  if (queue_.Empty() && local_.empty() && !stop_.load(std::memory_order_relaxed)) {
    sleep_cv_.wait_for(lock, Backoff::kNap);
  }
  sleeping_.store(false, std::memory_order_relaxed);
}

bool ProxyWorker::DrainSubmissions() {
  bool worked = false;
  for (size_t i = 0; i < kSubmissionsPerDrain && !current_; ++i) {
    std::optional<Submission> s = NextSubmission();
    if (!s) break;
    worked = true;
    switch (s->kind) {
      case Submission::Kind::kWrites: {
        size_t index = s->ticket - base_;
        if (remaining_.size() <= index) remaining_.resize(index + 1, -1);
        if (failed()) {  // never posted; waits report the failure
          remaining_[index] = 0;
          break;
        }
        remaining_[index] = static_cast<int64_t>(s->writes.size());
        current_ = std::move(s);
        current_next_ = 0;
        PostCurrent();
        break;
      }
      case Submission::Kind::kNotify:
        counter_->AddNotification(s->imm, s->notification);
        break;
      case Submission::Kind::kControl:
        s->control();
        break;
      case Submission::Kind::kNone:
        break;
    }
  }
  // Tickets with no writes (or dequeued after a failure) are complete at once.
  while (!remaining_.empty() && remaining_.front() == 0) {
    remaining_.pop_front();
    completed_.store(base_++, std::memory_order_release);
  }
  return worked;
}

std::optional<Submission> ProxyWorker::NextSubmission() {
  if (local_.empty()) return queue_.TryPop();
  std::optional<Submission> s(std::move(local_.front()));
  local_.pop_front();
  return s;
}

bool ProxyWorker::PostCurrent() {
  Submission& s = *current_;
  bool posted_any = false;
  while (current_next_ < s.writes.size()) {
    const WriteSpec& w = s.writes[current_next_];
    FabricDomain* domain;
    ssize_t rc;
    if (w.length > s.group->max_write(w.peer)) {
      rc = PostLeadingChunks(s, w, &domain);
    } else {
      OpContext* context = AcquireContext();
      context->kind = OpContext::Kind::kWrite;
      context->ticket = s.ticket;
      const fi_msg_rma* msg = nullptr;
      domain = s.group->Prepare(w, s.imm, context, &msg);
      rc = domain->PostWrite(*msg);
      if (rc != 0) free_contexts_.push_back(context);
    }
    if (rc == -FI_EAGAIN) {
      // The provider is out of send credits: progress the completion queues, then retry.
      return posted_any;
    }
    if (rc != 0) {
      Fail(FabricErrorText("fi_writemsg to peer " + std::to_string(w.peer) + " of peer group " +
                               std::to_string(s.group->id()) + " (domain " +
                               std::to_string(domain->index()) + ")",
                           rc));
      current_.reset();
      return true;
    }
    posted_any = true;
    ++current_next_;
  }
  current_.reset();
  return true;
}

ssize_t ProxyWorker::PostLeadingChunks(const Submission& s, const WriteSpec& w,
                                       FabricDomain** domain) {
  if (!splitting_) {
    splitting_ = std::make_unique<SplitWrite>(s.ticket, s.group, w, s.imm,
                                              s.group->max_write(w.peer));
  }
  SplitWrite& split = *splitting_;
  while (!split.all_posted()) {
    OpContext* context = AcquireContext();
    context->kind = OpContext::Kind::kChunk;
    context->split = &split;
    const WriteSpec chunk = split.NextChunk();
    const fi_msg_rma* msg = nullptr;
    *domain = s.group->Prepare(chunk, 0, context, &msg);
    ssize_t rc = (*domain)->PostChunk(*msg);
    if (rc != 0) {
      free_contexts_.push_back(context);
      // After a failure, chunks in flight still point at it.
      if (rc != -FI_EAGAIN) splits_.push_back(std::move(splitting_));
      return rc;
    }
    split.posted += chunk.length;
    ++split.in_flight;
  }
  splits_.push_back(std::move(splitting_));
  return 0;
}

bool ProxyWorker::PostLastChunks() {
  bool worked = false;
  while (!last_chunks_.empty()) {
    SplitWrite* split = last_chunks_.front();
    OpContext* context = AcquireContext();
    context->kind = OpContext::Kind::kWrite;
    context->ticket = split->ticket;
    const fi_msg_rma* msg = nullptr;
    FabricDomain* domain = split->group->Prepare(split->Last(), split->imm, context, &msg);
    ssize_t rc = domain->PostWrite(*msg);
    if (rc == -FI_EAGAIN) {
      free_contexts_.push_back(context);
      break;
    }
    worked = true;
    last_chunks_.pop_front();
    if (rc != 0) {
      free_contexts_.push_back(context);
      Fail(FabricErrorText("fi_writemsg of the last chunk of a split write to peer " +
                               std::to_string(split->write.peer) + " of peer group " +
                               std::to_string(split->group->id()) + " (domain " +
                               std::to_string(domain->index()) + ")",
                           rc));
    }
    auto it = std::find_if(splits_.begin(), splits_.end(),
                           [&](const std::unique_ptr<SplitWrite>& p) { return p.get() == split; });
    *it = std::move(splits_.back());
    splits_.pop_back();
  }
  return worked;
}

bool ProxyWorker::PollCompletions() {
  bool worked = false;
  fi_cq_data_entry entries[kCompletionsPerPoll];
  for (FabricDomain* domain : domains_) {
    ssize_t n = domain->ReadCompletions(entries, kCompletionsPerPoll);
    if (n == -FI_EAGAIN) continue;
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err;
      std::string text = domain->ReadCompletionError(&err);
      auto* context = static_cast<OpContext*>(err.op_context);
      std::string what = "a completion on domain " + std::to_string(domain->index());
      if (context && context->kind != OpContext::Kind::kReceive &&
          !(err.flags & FI_REMOTE_WRITE)) {
        what = "a write to peer " + std::to_string(context->peer) + " of peer group " +
               std::to_string(context->group) + " (domain " + std::to_string(context->domain) +
               ")";
        free_contexts_.push_back(context);
      }
      Fail(what + " failed: " + text);
      worked = true;
      continue;
    }
    if (n < 0) {
      Fail(FabricErrorText("fi_cq_read on domain " + std::to_string(domain->index()), n));
      continue;
    }
    for (ssize_t i = 0; i < n; ++i) {
      const fi_cq_data_entry& e = entries[i];
      if ((e.flags & FI_REMOTE_CQ_DATA) && (e.flags & (FI_REMOTE_WRITE | FI_RECV))) {
        OnArrival(static_cast<uint32_t>(e.data));
        // FI_RX_CQ_DATA mode: the arrival consumed a posted receive.
        auto* context = static_cast<OpContext*>(e.op_context);
        if ((e.flags & FI_RECV) && context && context->kind == OpContext::Kind::kReceive) {
          try {
            domain->RepostReceive(context);
          } catch (const Error& error) {
            Fail(error.what());
          }
        }
      } else if (e.op_context) {
        OnWriteCompletion(static_cast<OpContext*>(e.op_context));
      }
    }
    worked |= n > 0;
  }
  return worked;
}

void ProxyWorker::OnArrival(uint32_t imm) {
  if (reorder_) {
    reorder_->Hold({imm, nullptr}, Clock::now());
  } else {
    counter_->Arrive(imm);
  }
}

void ProxyWorker::OnWriteCompletion(OpContext* context) {
  if (reorder_) {
    reorder_->Hold({0, context}, Clock::now());
  } else {
    OnWriteCompleted(context);
  }
}

bool ProxyWorker::ReleaseHeld() {
  if (!reorder_ || reorder_->empty()) return false;
  const std::vector<ReorderBuffer::Event>& due = reorder_->Release(Clock::now());
  for (const ReorderBuffer::Event& e : due) {
    if (e.context) {
      OnWriteCompleted(e.context);
    } else {
      counter_->Arrive(e.imm);
    }
  }
  return !due.empty();
}

void ProxyWorker::OnWriteCompleted(OpContext* context) {
  free_contexts_.push_back(context);
  if (context->kind == OpContext::Kind::kChunk) {
    SplitWrite* split = context->split;
    if (--split->in_flight == 0 && split->all_posted()) last_chunks_.push_back(split);
    return;
  }
  size_t index = context->ticket - base_;
  if (index < remaining_.size()) --remaining_[index];
  while (!remaining_.empty() && remaining_.front() == 0) {
    remaining_.pop_front();
    completed_.store(base_++, std::memory_order_release);
  }
}

}  // namespace jem
