// The sticky error status a rank's kernels report to the host. It lives in mapped pinned host
// memory, so the host reads it without a device sync: the next call of a failed context
// returns it as an ffi::Error, and Python can read it after block_until_ready.
#pragma once

#include <cstdint>
#include <string>

namespace jem {

enum class DeviceError : uint32_t {
  kNone = 0,
  kBadExpertId = 1,     // a = token, b = slot, c = the id
  kBadNumTokens = 2,    // a = num_tokens
  kPeerFailed = 3,      // a = the peer whose route row says it failed
  kCapacity = 4,        // a = rank, b = rows it needs, c = records it needs
  kTimeout = 5,         // a = what was awaited (DeviceWait), b = peer, c = step
  kBadHandle = 6,       // a = which operand (HandleOperand), b = index, c = value
  kCorrupt = 7,         // a = sender, b = record, c = slot
  kSendTwice = 8,       // a = phase (StepPhase), b = the step sent and never received
  kRecvWithoutSend = 9, // a = phase (StepPhase), b = the last step sent, received already
};

enum class StepPhase : int64_t {
  kDispatch = 0,
  kCombine = 1,
};

enum class DeviceWait : int64_t {
  kDispatchCredit = 0,  // a receiver's credit for the previous dispatch
  kDispatchReady = 1,   // a sender's records
  kCombineCredit = 2,   // a home rank's credit for the previous combine
  kCombineReady = 3,    // an expert rank's partials
  kDispatchRoute = 4,   // a sender's route row (raised before its records)
  kOwnBlocks = 5,       // the other blocks of this rank's own kernel (b = rank, c = blocks)
};

enum class HandleOperand : int64_t {
  kRecvTokens = 0,
  kRecordRows = 1,
  kSendTokens = 2,
  kSendIndex = 3,
  kNumTokens = 4,
};

// Written by the first failing kernel thread: details first, then `code` after a system fence.
struct DeviceStatus {
  volatile uint32_t code;
  int32_t rank;
  volatile int64_t a;
  volatile int64_t b;
  volatile int64_t c;
};

// Limits the messages quote.
struct StatusLimits {
  int64_t num_experts;
  int64_t max_tokens;
  int64_t max_recv_tokens;
  int64_t max_recv_records;
  double timeout_s;
};

inline std::string DescribeDeviceStatus(const DeviceStatus& s, const StatusLimits& lim) {
  const std::string rank = "rank " + std::to_string(s.rank) + ": ";
  const auto n = [](int64_t v) { return std::to_string(v); };
  const auto phase = [&s] {
    return std::string(s.a == static_cast<int64_t>(StepPhase::kCombine) ? "combine" : "dispatch");
  };
  switch (static_cast<DeviceError>(s.code)) {
    case DeviceError::kNone:
      return {};
    case DeviceError::kBadExpertId:
      return rank + "topk_ids[" + n(s.a) + ", " + n(s.b) + "] = " + n(s.c) +
             " is not an expert id: expected -1 (unused slot) or a value in [0, num_experts = " +
             n(lim.num_experts) + ").";
    case DeviceError::kBadNumTokens:
      return rank + "num_tokens = " + n(s.a) + " is outside [0, max_tokens_per_rank = " +
             n(lim.max_tokens) + "].";
    case DeviceError::kPeerFailed:
      return rank + "rank " + n(s.a) +
             " failed before packing its tokens (bad input there); this step was abandoned.";
    case DeviceError::kCapacity:
      return rank + "the routing needs " + n(s.b) + " rows and " + n(s.c) + " records on rank " +
             n(s.a) + ", more than max_recv_tokens = " + n(lim.max_recv_tokens) +
             " (records at most " + n(lim.max_recv_records) +
             "); raise max_recv_tokens. Nothing was written out of bounds.";
    case DeviceError::kTimeout: {
      static const char* what[] = {"the credit of rank %d for the previous dispatch",
                                   "the dispatch records of rank %d",
                                   "the credit of rank %d for the previous combine",
                                   "the combine partials of rank %d",
                                   "the dispatch route counts of rank %d",
                                   "the other blocks of the kernel of rank %d"};
      std::string awaited = (s.a >= 0 && s.a < 6) ? what[s.a] : "rank %d";
      awaited.replace(awaited.find("%d"), 2, n(s.b));
      return rank + "timed out after " + std::to_string(lim.timeout_s) + " s waiting for " +
             awaited + " (step " + n(s.c) + "); is every rank running the same steps?";
    }
    case DeviceError::kBadHandle: {
      static const char* what[] = {"recv_tokens", "record_rows", "send_tokens", "send_index",
                                   "num_tokens"};
      const std::string operand = (s.a >= 0 && s.a < 5) ? what[s.a] : "a handle operand";
      return rank + operand + "[" + n(s.b) + "] = " + n(s.c) +
             " is out of range: combine needs the handle that dispatch returned.";
    }
    case DeviceError::kCorrupt:
      return rank + "record " + n(s.b) + " from rank " + n(s.a) + " (slot " + n(s.c) +
             ") disagrees with the route counts that rank sent; the receive buffer holds "
             "inconsistent data.";
    case DeviceError::kSendTwice:
      return rank + phase() + "_send ran twice without " + phase() + "_recv between (step " +
             n(s.b) + " was sent and never received); the second send was skipped.";
    case DeviceError::kRecvWithoutSend:
      return rank + phase() + "_recv ran without a " + phase() + "_send before it (nothing was " +
             "sent since step " + n(s.b) + "); it was skipped rather than read that step again.";
  }
  return rank + "unknown device error " + std::to_string(s.code) + ".";
}

}  // namespace jem
