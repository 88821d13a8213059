#include "cc/a2a/all_to_all_context.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace jem {
namespace {

void CheckLayout(const Layout& l, int rank) {
  auto fail = [](const std::string& what) { throw Error("invalid all-to-all layout: " + what); };
  if (l.num_ranks < 1) fail("num_ranks must be at least 1");
  if (rank < 0 || rank >= l.num_ranks) fail("rank outside [0, num_ranks)");
  if (l.num_experts < 1 || l.num_experts % l.num_ranks != 0) {
    fail("num_experts must be a positive multiple of the number of ranks");
  }
  if (l.experts_per_token < 1 || l.experts_per_token > l.num_experts) {
    fail("experts_per_token must be in [1, num_experts]");
  }
  if (l.hidden < 1 || l.max_tokens < 1) fail("hidden and max_tokens must be positive");
  if (l.max_recv_tokens < 1) fail("max_recv_tokens must be positive");
  if (l.expert_alignment < 1) fail("expert_alignment must be positive");
  if (l.dispatch_elem_bytes != 1 && l.dispatch_elem_bytes != 2 && l.dispatch_elem_bytes != 4) {
    fail("dispatch elements must be 1, 2 or 4 bytes");
  }
  if (l.combine_elem_bytes != 2 && l.combine_elem_bytes != 4) {
    fail("combine elements must be 2 or 4 bytes");
  }
  if (l.has_scales && l.hidden % kScaleBlock != 0) fail("hidden must be a multiple of 128 for fp8");
  // Record indices and rows travel as int32.
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  if (l.send_capacity() > int_max || l.max_recv_records() > int_max) fail("too many tokens");
}

}  // namespace

std::string FormatSeconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%g s", seconds);
  return text;
}

AllToAllContext::AllToAllContext(const EngineOptions& engine_options, const Layout& layout,
                                 int rank, double timeout_s)
    : layout_(layout), rank_(rank), timeout_s_(timeout_s) {
  CheckLayout(layout_, rank_);
  if (!(timeout_s_ > 0)) throw Error("timeout_s must be positive");
  engine_ = TransferEngine::Create(engine_options);
  const size_t bytes = static_cast<size_t>(layout_.arena_bytes());
  void* arena = nullptr;
  if (posix_memalign(&arena, 4096, bytes) != 0) {
    throw Error("cannot allocate the all-to-all arena of " + std::to_string(bytes) + " bytes");
  }
  arena_ = static_cast<uint8_t*>(arena);
  std::memset(arena_, 0, bytes);
  for (int s = 0; s < layout_.num_ranks; ++s) route_row(s)[0] = kRouteAwaited;
  try {
    region_ = engine_->RegisterMemory(arena_, bytes, MemoryKind::kHost);
  } catch (...) {
    std::free(arena_);
    throw;
  }
}

AllToAllContext::~AllToAllContext() {
  // Writes still in flight must not land in freed memory: stop the engine first.
  try {
    engine_->DeregisterMemory(region_);
  } catch (const Error&) {
    // The engine reports its own failure; the memory is released with it below.
  }
  engine_.reset();
  std::free(arena_);
}

void AllToAllContext::Connect(const std::vector<PeerSpec>& ranks) {
  if (static_cast<int>(ranks.size()) != layout_.num_ranks) {
    throw Error("connect needs one address and descriptor per rank: got " +
                std::to_string(ranks.size()) + " for " + std::to_string(layout_.num_ranks) +
                " ranks");
  }
  if (connected_) throw Error("this all-to-all context is already connected");
  std::vector<PeerSpec> others;
  for (int r = 0; r < layout_.num_ranks; ++r) {
    if (r != rank_) others.push_back(ranks[r]);
  }
  if (!others.empty()) peers_ = engine_->AddPeerGroup(region_, others);
  connected_ = true;
}

void AllToAllContext::WaitArrivals(ImmKind kind, uint32_t seq, uint32_t count,
                                   const std::string& what) {
  if (count == 0) return;
  const uint32_t imm = MakeImm(kind, seq);
  try {
    engine_->WaitImm(imm, count, timeout_s_);
  } catch (const TimeoutError& e) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", imm);
    throw TimeoutError("timed out after " + FormatSeconds(timeout_s_) + " waiting for " + what +
                       " (" + std::to_string(count) + " writes with immediate " + hex +
                       "); a peer may be dead or not running the same step. [" + e.what() + "]");
  }
}

void AllToAllContext::WaitAllSent() {
  for (SendTicket ticket : tickets_) engine_->WaitSent(ticket, timeout_s_);
  tickets_.clear();
}

void AllToAllContext::CheckUsable() const {
  std::lock_guard<std::mutex> lock(failure_mutex_);
  if (!failure_.empty()) {
    throw ContextUnusable("this AllToAll failed earlier and cannot be used again; close it "
                          "and create a new one. The first error was: " + failure_);
  }
  if (!connected_) {
    throw ContextUnusable("this all-to-all context is not connected to its peers yet");
  }
}

void AllToAllContext::Fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(failure_mutex_);
  if (failure_.empty()) failure_ = message;
}

}  // namespace jem
