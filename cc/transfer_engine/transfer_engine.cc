// TransferEngine::Create and the engine: domains, registrations and peer groups owned here,
// fabric work done by the proxy worker, waits with deadlines on the caller's thread.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/backoff.h"
#include "cc/transfer_engine/clock.h"
#include "cc/transfer_engine/fabric_domain.h"
#include "cc/transfer_engine/imm_counter.h"
#include "cc/transfer_engine/memory_region.h"
#include "cc/transfer_engine/peer_group.h"
#include "cc/transfer_engine/proxy_worker.h"

namespace jem {
namespace {

// Setup tasks (registration, address resolution) run on the proxy thread; they take
// milliseconds, so this bound only catches a wedged proxy.
constexpr double kSetupTimeoutS = 60.0;

Clock::time_point Deadline(double timeout_s) {
  if (!(timeout_s >= 0)) throw Error("timeout_s must be a non-negative number of seconds");
  // Clamp absurd timeouts so the addition cannot overflow.
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(std::min(timeout_s, 1e9)));
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g s", s);
  return buf;
}

// JEM_REORDER_SEED: the one place the environment can turn on the reorder test mode, so that
// every engine (the CPU and GPU all-to-all paths included) honours it. 0 or unset: off.
uint64_t ReorderSeedFromEnvironment() {
  const char* text = std::getenv("JEM_REORDER_SEED");
  if (!text || !*text) return 0;
  char* end = nullptr;
  errno = 0;
  unsigned long long seed = std::strtoull(text, &end, 0);
  if (errno != 0 || *end != '\0' || text[0] == '-') {
    throw Error(std::string("JEM_REORDER_SEED='") + text +
                "' is not an unsigned 64-bit integer (0 or unset turns reordering off)");
  }
  return seed;
}

class Engine final : public TransferEngine {
 public:
  explicit Engine(const EngineOptions& options)
      : options_(options), domains_(FabricDomain::OpenAll(options)) {
    std::vector<FabricDomain*> raw;
    std::vector<Bytes> names;
    for (const auto& d : domains_) {
      raw.push_back(d.get());
      names.push_back(d->name());
    }
    address_ = SerializeAddress(names);
    worker_ = std::make_unique<ProxyWorker>(std::move(raw), &counter_, options_);
  }

  ~Engine() override {
    // Stop the proxy first: after that nothing else touches the fabric, and registrations
    // and groups can be released here before their domains close.
    worker_.reset();
    groups_.clear();
    regions_.clear();
    domains_.clear();
  }

  Bytes Address() const override { return address_; }
  int NumDomains() const override { return static_cast<int>(domains_.size()); }
  std::string Provider() const override { return domains_[0]->provider(); }
  bool SupportsCudaMemory() const override { return domains_[0]->supports_hmem(); }

  MemoryRegionId RegisterMemory(void* ptr, size_t length, MemoryKind kind) override {
    if (kind == MemoryKind::kCuda && !SupportsCudaMemory()) {
      throw Error("provider '" + Provider() +
                  "' cannot register CUDA memory here (no FI_HMEM, or no cuda_device given); "
                  "stage through pinned host memory");
    }
    uint32_t id = next_region_id_.fetch_add(1);
    // Shared with the task, which may outlive this call if the proxy is wedged.
    auto region = std::make_shared<std::unique_ptr<MemoryRegion>>();
    int cuda_device = options_.cuda_device;
    auto* domains = &domains_;
    worker_->RunOnProxy(
        [=] {
          *region = std::make_unique<MemoryRegion>(*domains, ptr, length, kind, cuda_device, id);
        },
        kSetupTimeoutS);
    std::lock_guard<std::mutex> lock(mu_);
    regions_.emplace(id, std::move(*region));
    return MemoryRegionId{id};
  }

  void DeregisterMemory(MemoryRegionId region) override {
    std::unique_ptr<MemoryRegion> owned;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = regions_.find(region.value);
      if (it == regions_.end()) throw Error(Unregistered(region));
      owned = std::move(it->second);
      regions_.erase(it);
    }
    // fi_close on the proxy thread, after every write submitted before this call was posted.
    MemoryRegion* raw = owned.release();
    worker_->RunOnProxy([raw] { delete raw; }, kSetupTimeoutS);
  }

  Bytes Descriptor(MemoryRegionId region) const override {
    std::lock_guard<std::mutex> lock(mu_);
    return FindRegion(region).Remote().Serialize();
  }

  PeerGroupId AddPeerGroup(MemoryRegionId local, const std::vector<PeerSpec>& peers) override {
    std::vector<ParsedPeer> parsed = ParsePeers(peers);
    const MemoryRegion* region;
    {
      std::lock_guard<std::mutex> lock(mu_);
      region = &FindRegion(local);
    }
    uint32_t id = next_group_id_.fetch_add(1);
    auto group = std::make_shared<std::unique_ptr<PeerGroup>>();
    auto shared_parsed = std::make_shared<std::vector<ParsedPeer>>(std::move(parsed));
    auto* domains = &domains_;
    worker_->RunOnProxy(
        [=] { *group = std::make_unique<PeerGroup>(id, *region, *domains, *shared_parsed); },
        kSetupTimeoutS);
    std::lock_guard<std::mutex> lock(mu_);
    // Groups added concurrently may finish out of order; ids index the table.
    if (groups_.size() <= id) groups_.resize(id + 1);
    groups_[id] = std::move(*group);
    return PeerGroupId{id};
  }

  SendTicket Scatter(PeerGroupId group, const WriteSpec* writes, size_t num_writes,
                     uint32_t imm) override {
    Submission s;
    s.kind = Submission::Kind::kWrites;
    s.imm = imm;
    s.writes.assign(writes, writes + num_writes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      s.group = &FindGroup(group);
      for (const WriteSpec& w : s.writes) s.group->Check(w);
    }
    return Enqueue(std::move(s));
  }

  SendTicket Barrier(PeerGroupId group, uint32_t imm) override {
    Submission s;
    s.kind = Submission::Kind::kWrites;
    s.imm = imm;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s.group = &FindGroup(group);
    }
    s.writes.resize(s.group->size());
    for (uint32_t p = 0; p < s.writes.size(); ++p) s.writes[p].peer = p;
    return Enqueue(std::move(s));
  }

  void WaitSent(SendTicket ticket, double timeout_s) override {
    NotOnProxy("WaitSent");
    auto deadline = Deadline(timeout_s);
    if (ticket == 0 || ticket >= next_ticket_.load()) {
      throw Error("unknown send ticket " + std::to_string(ticket));
    }
    bool done = worker_->PollUntil([&] { return worker_->completed() >= ticket; }, deadline);
    ThrowIfFailed();
    if (!done) {
      throw TimeoutError("writes of send ticket " + std::to_string(ticket) +
                         " did not complete within " + Seconds(timeout_s) +
                         ": a peer may have died or stopped making progress");
    }
  }

  void WaitImm(uint32_t imm, uint32_t count, double timeout_s) override {
    NotOnProxy("WaitImm");
    auto deadline = Deadline(timeout_s);
    ImmCounter::Waiter waiter(&counter_);
    const Backoff backoff(options_.busy_poll);
    for (;;) {
      ThrowIfFailed();
      uint64_t generation;
      if (counter_.TryConsume(imm, count, &generation)) return;
      auto now = Clock::now();
      if (now >= deadline) break;
      if (!backoff.SpinOrYield(now)) {
        counter_.WaitForArrival(generation,
                                std::min(deadline, now + std::chrono::milliseconds(10)));
      }
    }
    throw TimeoutError("timed out after " + Seconds(timeout_s) + " waiting for " +
                       std::to_string(count) + " arrivals of immediate " + std::to_string(imm) +
                       " (" + std::to_string(counter_.Pending(imm)) +
                       " arrived): a peer may have died or not sent");
  }

  void NotifyImm(uint32_t imm, uint32_t count, volatile uint32_t* flag,
                 uint32_t value) override {
    if (!flag) throw Error("NotifyImm needs a flag");
    Notify(imm, {count, flag, value, nullptr, nullptr});
  }

  void NotifyImm(uint32_t imm, uint32_t count, void (*callback)(void*), void* arg) override {
    if (!callback) throw Error("NotifyImm needs a callback");
    Notify(imm, {count, nullptr, 0, callback, arg});
  }

  bool TryConsumeImm(uint32_t imm, uint32_t count) override {
    ThrowIfFailed();
    uint64_t generation;
    return counter_.TryConsume(imm, count, &generation);
  }

  uint64_t AddPollHook(std::function<bool()> hook) override {
    if (!hook) throw Error("AddPollHook needs a hook");
    return worker_->AddHook(std::move(hook));
  }

  void RemovePollHook(uint64_t id) override { worker_->RemoveHook(id); }

  int PeerDomain(PeerGroupId group, uint32_t peer) const override {
    std::lock_guard<std::mutex> lock(mu_);
    const PeerGroup& g = FindGroup(group);
    if (peer >= g.size()) {
      throw Error("peer " + std::to_string(peer) + " of peer group " +
                  std::to_string(group.value) + ", which has " + std::to_string(g.size()) +
                  " peers");
    }
    return static_cast<int>(g.domain_of(peer));
  }

  std::string DomainName(int index) const override {
    if (index < 0 || index >= NumDomains()) {
      throw Error("domain " + std::to_string(index) + " of an engine with " +
                  std::to_string(NumDomains()) + " domains");
    }
    return domains_[index]->nic_name();
  }

  std::string FailureMessage() const override { return worker_->failure(); }

 private:
  static std::string Unregistered(MemoryRegionId region) {
    return "memory region " + std::to_string(region.value) +
           " is not registered with this engine (never registered, or deregistered)";
  }

  const MemoryRegion& FindRegion(MemoryRegionId region) const {
    auto it = regions_.find(region.value);
    if (it == regions_.end()) throw Error(Unregistered(region));
    return *it->second;
  }

  PeerGroup& FindGroup(PeerGroupId group) const {
    if (group.value >= groups_.size() || !groups_[group.value]) {
      throw Error("unknown peer group " + std::to_string(group.value));
    }
    PeerGroup& g = *groups_[group.value];
    if (!regions_.count(g.region_id())) {
      throw Error("peer group " + std::to_string(group.value) + " writes from " +
                  Unregistered(MemoryRegionId{g.region_id()}));
    }
    return g;
  }

  // The proxy thread (a hook, a callback) must not wait: only it makes the progress awaited.
  void NotOnProxy(const char* what) const {
    if (worker_->OnProxyThread()) {
      throw Error(std::string(what) +
                  " cannot be called on the proxy thread (from a poll hook or callback): it "
                  "would wait for itself; use TryConsumeImm or a notification");
    }
  }

  void ThrowIfFailed() const {
    if (worker_->failed()) throw Error("transfer engine failed: " + worker_->failure());
  }

  SendTicket Enqueue(Submission&& s) {
    ThrowIfFailed();
    s.ticket = next_ticket_.fetch_add(1);
    SendTicket ticket = s.ticket;
    worker_->Submit(std::move(s));
    return ticket;
  }

  void Notify(uint32_t imm, const ImmCounter::Notification& n) {
    ThrowIfFailed();
    Submission s;
    s.kind = Submission::Kind::kNotify;
    s.imm = imm;
    s.notification = n;
    worker_->Submit(std::move(s));
  }

  EngineOptions options_;
  std::vector<std::unique_ptr<FabricDomain>> domains_;
  Bytes address_;
  ImmCounter counter_;
  mutable std::mutex mu_;
  std::unordered_map<uint32_t, std::unique_ptr<MemoryRegion>> regions_;
  std::vector<std::unique_ptr<PeerGroup>> groups_;
  std::atomic<uint32_t> next_group_id_{0};
  std::atomic<uint32_t> next_region_id_{1};
  std::atomic<SendTicket> next_ticket_{1};
  std::unique_ptr<ProxyWorker> worker_;
};

}  // namespace

std::unique_ptr<TransferEngine> TransferEngine::Create(const EngineOptions& options) {
  EngineOptions resolved = options;
  if (resolved.reorder_seed == 0) resolved.reorder_seed = ReorderSeedFromEnvironment();
  return std::make_unique<Engine>(resolved);
}

}  // namespace jem
