#include "cc/transfer_engine/proxy_worker.h"

#include <pthread.h>
#include <rdma/fi_errno.h>
#include <sched.h>

#include <cstring>
#include <future>

namespace jem {
namespace {

constexpr size_t kQueueCapacity = 4096;
constexpr size_t kCompletionsPerPoll = 64;
constexpr size_t kSubmissionsPerDrain = 64;
// Idle policy when not busy-polling: spin, then yield the core, then sleep in short naps.
// Ranks often outnumber cores (8 ranks on 2 in CI), so idle proxies must give the CPU away.
constexpr auto kSpinFor = std::chrono::microseconds(20);
constexpr auto kYieldFor = std::chrono::microseconds(1000);
constexpr auto kNap = std::chrono::microseconds(100);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

ProxyWorker::ProxyWorker(std::vector<FabricDomain*> domains, ImmCounter* counter,
                         const EngineOptions& options)
    : domains_(std::move(domains)), counter_(counter), options_(options),
      queue_(kQueueCapacity) {
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

void ProxyWorker::Submit(Submission&& s) {
  while (!queue_.TryPush(s)) {
    if (stop_.load(std::memory_order_relaxed)) throw Error("the engine is shutting down");
    sched_yield();
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    sleep_cv_.notify_one();
  }
}

void ProxyWorker::RunOnProxy(std::function<void()> fn, double timeout_s) {
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
  const auto start = Clock::now();
  for (;;) {
    if (pred()) return true;
    if (failed()) return false;
    auto now = Clock::now();
    if (now >= deadline) return false;
    if (options_.busy_poll || now - start < kSpinFor) {
      CpuRelax();
    } else if (now - start < kYieldFor) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
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

void ProxyWorker::Loop() {
  auto last_work = Clock::now();
  while (!stop_.load(std::memory_order_relaxed)) {
    bool worked = false;
    if (current_) {
      worked |= PostCurrent();
    } else {
      worked |= DrainSubmissions();
    }
    worked |= PollCompletions();
    auto now = Clock::now();
    if (worked) {
      last_work = now;
    } else if (!options_.busy_poll) {
      // Sends in flight or someone waiting on arrivals: keep polling, but let other ranks
      // sharing this core run in between.
      bool active = !remaining_.empty() || current_ || counter_->HasWaiters();
      if (active) {
        sched_yield();
      } else {
        Idle(now - last_work);
      }
    } else {
      CpuRelax();
    }
  }
}

void ProxyWorker::Idle(Clock::duration idle_for) {
  if (idle_for < kSpinFor) {
    CpuRelax();
  } else if (idle_for < kYieldFor) {
    sched_yield();
  } else {
    std::unique_lock<std::mutex> lock(sleep_mu_);
    sleeping_.store(true, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // A nap bounded by kNap: incoming writes need CQ polling to make progress too.
    if (queue_.Empty() && !stop_.load(std::memory_order_relaxed)) {
      sleep_cv_.wait_for(lock, kNap);
    }
    sleeping_.store(false, std::memory_order_relaxed);
  }
}

bool ProxyWorker::DrainSubmissions() {
  bool worked = false;
  for (size_t i = 0; i < kSubmissionsPerDrain && !current_; ++i) {
    std::optional<Submission> s = queue_.TryPop();
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

bool ProxyWorker::PostCurrent() {
  Submission& s = *current_;
  bool posted_any = false;
  while (current_next_ < s.writes.size()) {
    OpContext* context = AcquireContext();
    context->kind = OpContext::Kind::kWrite;
    context->ticket = s.ticket;
    const fi_msg_rma* msg = nullptr;
    FabricDomain* domain = s.group->Prepare(s.writes[current_next_], s.imm, context, &msg);
    ssize_t rc = domain->PostWrite(*msg);
    if (rc == -FI_EAGAIN) {
      // The provider is out of send credits: progress the completion queues, then retry.
      free_contexts_.push_back(context);
      return posted_any;
    }
    if (rc != 0) {
      free_contexts_.push_back(context);
      Fail(FabricErrorText("fi_writemsg to peer " + std::to_string(s.writes[current_next_].peer) +
                               " of peer group " + std::to_string(s.group->id()) +
                               " (domain " + std::to_string(domain->index()) + ")",
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
      if (context && context->kind == OpContext::Kind::kWrite && !(err.flags & FI_REMOTE_WRITE)) {
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
        counter_->Arrive(static_cast<uint32_t>(e.data));
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
        OnWriteCompleted(static_cast<OpContext*>(e.op_context));
      }
    }
    worked |= n > 0;
  }
  return worked;
}

void ProxyWorker::OnWriteCompleted(OpContext* context) {
  size_t index = context->ticket - base_;
  free_contexts_.push_back(context);
  if (index < remaining_.size()) --remaining_[index];
  while (!remaining_.empty() && remaining_.front() == 0) {
    remaining_.pop_front();
    completed_.store(base_++, std::memory_order_release);
  }
}

}  // namespace jem
