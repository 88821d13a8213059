// Two ranks (fork) over tcp;ofi_rxm: each scatters random slices of random bytes into the
// other's region with immediates, waits for the other's writes by counting immediates, and
// checks every byte against what the sender's seed says it wrote; then host-flag and callback
// releases (NotifyImm), and poll hooks that answer the peer from the proxy thread. Exit code 0
// on success.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/backoff.h"
#include "cc/transfer_engine/forked_ranks.h"

namespace {

constexpr size_t kRegion = 1 << 20;  // first half: source bytes; second half: landing area
constexpr size_t kHalf = kRegion / 2;
constexpr int kWrites = 64;
constexpr uint32_t kImm = 0xC0FFEE;
constexpr uint32_t kBarrierImm = 7;
constexpr uint32_t kFlagImm = 8;
constexpr uint32_t kCallbackImm = 9;
constexpr uint32_t kPingImm = 10;
constexpr uint32_t kBurstImm = 11;
constexpr uint32_t kHookBarrierImm = 12;
// More scatters than the submission queue holds, posted by one hook call.
constexpr int kBurst = 5000;
constexpr double kTimeoutS = 30.0;

// Everything rank `rank` writes is derived from its seed, so the receiver can recompute it.
std::vector<uint8_t> SourceBytes(int rank) {
  std::mt19937_64 rng(1000 + rank);
  std::vector<uint8_t> bytes(kHalf);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

// Disjoint destination slots, random source offsets and lengths (some zero).
std::vector<jem::WriteSpec> Writes(int rank) {
  std::mt19937_64 rng(2000 + rank);
  const size_t slot = kHalf / kWrites;
  std::vector<jem::WriteSpec> writes;
  for (int i = 0; i < kWrites; ++i) {
    jem::WriteSpec w;
    w.length = rng() % (slot + 1);
    w.src_offset = rng() % (kHalf - w.length + 1);
    w.dst_offset = kHalf + i * slot;
    writes.push_back(w);
  }
  return writes;
}

template <typename Pred>
bool Await(Pred pred, double timeout_s = kTimeoutS) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const jem::Backoff backoff(/*busy_poll=*/false);
  while (!pred()) {
    const auto now = std::chrono::steady_clock::now();
    if (now > deadline) return false;
    backoff.Pause(now);
  }
  return true;
}

int Expect(bool ok, int rank, const char* what) {
  if (!ok) std::fprintf(stderr, "rank %d: %s\n", rank, what);
  return ok ? 0 : 1;
}

// A hook answers the peer's ping, on the proxy thread, with a barrier and a burst of scatters
// larger than the submission queue; a counting hook stops for good once removed.
int CheckHooks(jem::TransferEngine& engine, jem::PeerGroupId group, int rank) {
  int bad = 0;
  std::atomic<bool> answered{false};
  std::atomic<int> wait_refused{0};
  uint64_t answer = engine.AddPollHook([&] {
    if (answered.load() || !engine.TryConsumeImm(kPingImm, 1)) return false;
    try {
      engine.WaitImm(kPingImm, 1, 1.0);
    } catch (const jem::Error&) {
      ++wait_refused;
    }
    engine.Barrier(group, kHookBarrierImm);
    jem::WriteSpec zero;
    for (int i = 0; i < kBurst; ++i) engine.Scatter(group, &zero, 1, kBurstImm);
    answered = true;
    return true;
  });
  std::atomic<uint64_t> turns{0};
  uint64_t counting = engine.AddPollHook([&] {
    ++turns;
    return false;
  });
  bad += Expect(Await([&] { return turns.load() > 100; }), rank, "counting hook never ran");
  engine.RemovePollHook(counting);
  uint64_t after_remove = turns.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  bad += Expect(turns.load() == after_remove, rank, "a removed hook ran again");

  jem::WriteSpec zero;
  engine.WaitSent(engine.Scatter(group, &zero, 1, kPingImm), kTimeoutS);
  engine.WaitImm(kHookBarrierImm, 1, kTimeoutS);
  engine.WaitImm(kBurstImm, kBurst, kTimeoutS);
  // Our hook answers the peer's ping, which may still be on its way.
  bad += Expect(Await([&] { return answered.load(); }), rank, "the hook did not answer");
  bad += Expect(wait_refused.load() == 1, rank, "WaitImm on the proxy thread was not refused");
  engine.RemovePollHook(answer);
  bad += Expect(!engine.TryConsumeImm(kBurstImm, 1), rank, "more burst arrivals than sent");
  bad += Expect(engine.PeerDomain(group, 0) == 0 && !engine.DomainName(0).empty(), rank,
                "PeerDomain/DomainName");
  return bad;
}

// An exception thrown by a hook fails the engine with its text, and waits then report it.
int CheckThrowingHook(int rank) {
  jem::EngineOptions options;
  options.provider = "tcp;ofi_rxm";
  auto engine = jem::TransferEngine::Create(options);
  uint64_t id = engine->AddPollHook([]() -> bool { throw std::runtime_error("hook boom"); });
  int bad = Expect(Await([&] { return !engine->FailureMessage().empty(); }), rank,
                   "a throwing hook did not fail the engine");
  bad += Expect(engine->FailureMessage().find("hook boom") != std::string::npos, rank,
                "the failure lacks the hook's text");
  try {
    engine->WaitImm(1, 1, 5.0);
    bad += Expect(false, rank, "WaitImm after a hook failure did not throw");
  } catch (const jem::TimeoutError&) {
    bad += Expect(false, rank, "WaitImm after a hook failure timed out");
  } catch (const jem::Error& e) {
    bad += Expect(std::string(e.what()).find("hook boom") != std::string::npos, rank,
                  "WaitImm's error lacks the hook's text");
  }
  engine->RemovePollHook(id);  // dropped when it threw: accepted
  return bad;
}

int Run(int rank, const jem::AllGather& all_gather) {
  jem::EngineOptions options;
  options.provider = "tcp;ofi_rxm";
  auto engine = jem::TransferEngine::Create(options);
  std::vector<uint8_t> region(kRegion, 0);
  std::vector<uint8_t> source = SourceBytes(rank);
  std::memcpy(region.data(), source.data(), kHalf);
  jem::MemoryRegionId mr = engine->RegisterMemory(region.data(), region.size(),
                                                  jem::MemoryKind::kHost);
  const int other = 1 - rank;
  jem::PeerSpec peer{all_gather(engine->Address())[other],
                     all_gather(engine->Descriptor(mr))[other]};
  jem::PeerGroupId group = engine->AddPeerGroup(mr, {peer});

  std::vector<jem::WriteSpec> writes = Writes(rank);
  jem::SendTicket ticket = engine->Scatter(group, writes.data(), writes.size(), kImm);
  engine->WaitSent(ticket, kTimeoutS);
  engine->WaitImm(kImm, kWrites, kTimeoutS);

  std::vector<uint8_t> theirs = SourceBytes(other);
  int bad = 0;
  for (const jem::WriteSpec& w : Writes(other)) {
    if (std::memcmp(region.data() + w.dst_offset, theirs.data() + w.src_offset, w.length) != 0) {
      ++bad;
    }
  }
  // Asynchronous releases: a host flag stored by the proxy, and a callback on the proxy thread.
  volatile uint32_t flag = 0;
  std::atomic<int> called{0};
  engine->NotifyImm(kFlagImm, 2, &flag, 42);
  engine->NotifyImm(kCallbackImm, 1, [](void* arg) { ++*static_cast<std::atomic<int>*>(arg); },
                    &called);
  std::vector<jem::WriteSpec> signals(2);
  engine->WaitSent(engine->Scatter(group, signals.data(), 2, kFlagImm), kTimeoutS);
  engine->WaitSent(engine->Scatter(group, signals.data(), 1, kCallbackImm), kTimeoutS);
  if (!Await([&] { return __atomic_load_n(&flag, __ATOMIC_ACQUIRE) == 42 && called == 1; })) {
    std::fprintf(stderr, "rank %d: flag %u, callback called %d times\n", rank, flag,
                 called.load());
    ++bad;
  }

  int hook_errors = CheckHooks(*engine, group, rank) + CheckThrowingHook(rank);

  // Both ranks have checked before either closes its endpoint.
  engine->WaitSent(engine->Barrier(group, kBarrierImm), kTimeoutS);
  engine->WaitImm(kBarrierImm, 1, kTimeoutS);
  std::printf("rank %d: %d of %d writes wrong, %d hook checks failed\n", rank, bad, kWrites,
              hook_errors);
  bad += hook_errors;
  std::fflush(stdout);
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main() {
  setenv("FI_TCP_IFACE", "lo", 0);
  return jem::RunForkedRanks(2, Run);
}
