// The one place where the all-to-all buffer layout is computed: offsets, strides, record and
// slot sizes. Included by host code, CUDA kernels and tests; keep it header-only and free of
// anything a device compiler cannot take.
//
// Per rank, one symmetric "arena" (same size and offsets on every rank) is allocated and
// registered once:
//
//   route[R][R][1 + L]         int32: row s = sender s's whole send plan, one entry per
//                              destination d: [tokens, tokens for d's local expert 0 .. L-1].
//                              Every rank receives every row, so each knows the full count
//                              matrix: capacity verdicts agree on all ranks, and overflow and
//                              combine offsets into any peer's buffers can be computed.
//                              Entry 0's token count is kRouteFailed when the sender
//                              failed before packing (bad input): receivers fail at once.
//   dispatch_send[send_cap]    records, one contiguous chunk per destination rank,
//                              chunk d at sum_{d' < d} tokens(me -> d')
//   dispatch_recv_private[R][P] records: sender s writes its first min(n, P) records here at
//                              once, before any routing counts are known
//   dispatch_recv_overflow[max_recv_records] records: sender s writes the rest at
//                              sum_{s' < s} max(0, tokens(s' -> me) - P), once routes are known
//   combine_send[max_recv_records] rows of combine partials, grouped by home rank s at
//                              sum_{s' < s} tokens(s' -> me), in s's record order
//   combine_recv[send_cap]     rows: expert rank d writes the partials of my tokens at
//                              sum_{d' < d} tokens(me -> d'), the same index as dispatch_send
//
// A dispatch record is one token on the wire, sent once per destination rank however many of
// its k experts live there:
//   x[H] (dispatch dtype) | scales[H / 128] (float32, fp8 only) |
//   src_token (int32) | local_expert[k] (int32, -1 = not on this rank) | weight[k] (float32)
// padded to 16 bytes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JEM_HD __host__ __device__
#else
#define JEM_HD
#endif

namespace jem {

constexpr int64_t kScaleBlock = 128;   // fp8 scales: one float32 per 128 channels
constexpr int64_t kRecordAlign = 16;   // 16-byte vector loads and stores
constexpr int32_t kRouteFailed = -1;   // token count of a route row whose sender failed
constexpr int32_t kRouteAwaited = INT32_MIN;  // a receiver's mark on a row not yet arrived

JEM_HD constexpr int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
JEM_HD constexpr int64_t CeilDiv(int64_t x, int64_t a) { return (x + a - 1) / a; }
// For kernels: a 32-bit division is a fraction of the code of a 64-bit one.
JEM_HD constexpr int32_t CeilDiv32(int32_t x, int32_t a) { return (x + a - 1) / a; }
JEM_HD constexpr int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// Immediate data: kind in the top 4 bits, a 28-bit step sequence below. Arrivals are counted
// per value, summed over senders.
enum class ImmKind : uint32_t {
  kRoute = 1,           // a sender's route row landed
  kDispatchData = 2,    // a private-slot or overflow write landed
  kDispatchCredit = 3,  // a receiver finished unpacking: its dispatch_recv may be reused
  kCombineData = 4,     // a partials write landed
  kCombineCredit = 5,   // a home rank finished summing: its combine_recv may be reused
  kBarrier = 6,
};
JEM_HD constexpr uint32_t MakeImm(ImmKind kind, uint32_t seq) {
  return (static_cast<uint32_t>(kind) << 28) | (seq & 0x0FFFFFFFu);
}

struct Layout {
  // Configuration (identical on every rank).
  int32_t num_ranks = 0;           // R
  int32_t num_experts = 0;         // E, a multiple of R
  int32_t experts_per_token = 0;   // k
  int32_t hidden = 0;              // H
  int32_t max_tokens = 0;          // T, tokens per rank
  int32_t max_recv_tokens = 0;     // rows of expert_x (expanded per expert, with padding)
  int32_t expert_alignment = 1;    // group sizes rounded up to this
  int32_t dispatch_elem_bytes = 2; // 1 (fp8), 2 (bf16), 4 (fp32)
  int32_t combine_elem_bytes = 2;  // 2 (bf16), 4 (fp32)
  bool has_scales = false;         // fp8 dispatch carries float32 scales

  JEM_HD int64_t local_experts() const { return num_experts / num_ranks; }
  JEM_HD int64_t num_scales() const { return has_scales ? hidden / kScaleBlock : 0; }

  // Unique tokens one rank can receive: each record expands to at least one row.
  JEM_HD int64_t max_recv_records() const {
    return Min(static_cast<int64_t>(num_ranks) * max_tokens, max_recv_tokens);
  }
  // Records one rank can send: each token goes to at most min(k, R) ranks.
  JEM_HD int64_t send_capacity() const {
    return static_cast<int64_t>(max_tokens) * Min(experts_per_token, num_ranks);
  }
  // Private slot per sender.
  JEM_HD int64_t private_records() const {
    return Min(max_tokens, CeilDiv(max_recv_records(), num_ranks));
  }

  // --- dispatch record ---
  JEM_HD int64_t x_bytes() const { return static_cast<int64_t>(hidden) * dispatch_elem_bytes; }
  JEM_HD int64_t scale_offset() const { return x_bytes(); }
  JEM_HD int64_t meta_offset() const { return scale_offset() + num_scales() * 4; }
  JEM_HD int64_t src_token_offset() const { return meta_offset(); }
  JEM_HD int64_t expert_offset() const { return meta_offset() + 4; }
  JEM_HD int64_t weight_offset() const { return expert_offset() + 4 * experts_per_token; }
  JEM_HD int64_t record_bytes() const {
    return AlignUp(weight_offset() + 4 * experts_per_token, kRecordAlign);
  }

  // --- combine row ---
  JEM_HD int64_t combine_row_bytes() const {
    return AlignUp(static_cast<int64_t>(hidden) * combine_elem_bytes, kRecordAlign);
  }

  // --- arena ---
  JEM_HD int64_t route_entry_ints() const { return 1 + local_experts(); }
  JEM_HD int64_t route_row_ints() const { return num_ranks * route_entry_ints(); }
  JEM_HD int64_t route_offset() const { return 0; }
  JEM_HD int64_t route_row_offset(int64_t sender) const {
    return route_offset() + sender * route_row_ints() * 4;
  }
  JEM_HD int64_t route_bytes() const {
    return AlignUp(static_cast<int64_t>(num_ranks) * route_row_ints() * 4, 256);
  }
  JEM_HD int64_t dispatch_send_offset() const { return route_offset() + route_bytes(); }
  JEM_HD int64_t dispatch_send_record_offset(int64_t index) const {
    return dispatch_send_offset() + index * record_bytes();
  }
  JEM_HD int64_t private_offset() const {
    return dispatch_send_offset() + AlignUp(send_capacity() * record_bytes(), 256);
  }
  JEM_HD int64_t private_record_offset(int64_t sender, int64_t index) const {
    return private_offset() + (sender * private_records() + index) * record_bytes();
  }
  JEM_HD int64_t overflow_offset() const {
    return private_offset() + AlignUp(num_ranks * private_records() * record_bytes(), 256);
  }
  JEM_HD int64_t overflow_record_offset(int64_t index) const {
    return overflow_offset() + index * record_bytes();
  }
  // Where record `index` of sender `sender` lands on the receiver, given the sender's
  // overflow start (sum over earlier senders of their overflow counts).
  JEM_HD int64_t recv_record_offset(int64_t sender, int64_t index, int64_t overflow_start) const {
    return index < private_records()
               ? private_record_offset(sender, index)
               : overflow_record_offset(overflow_start + index - private_records());
  }
  JEM_HD int64_t combine_send_offset() const {
    return overflow_offset() + AlignUp(max_recv_records() * record_bytes(), 256);
  }
  JEM_HD int64_t combine_send_row_offset(int64_t index) const {
    return combine_send_offset() + index * combine_row_bytes();
  }
  JEM_HD int64_t combine_recv_offset() const {
    return combine_send_offset() + AlignUp(max_recv_records() * combine_row_bytes(), 256);
  }
  JEM_HD int64_t combine_recv_row_offset(int64_t index) const {
    return combine_recv_offset() + index * combine_row_bytes();
  }
  JEM_HD int64_t arena_bytes() const {
    return combine_recv_offset() + AlignUp(send_capacity() * combine_row_bytes(), 256);
  }

  // Default max_recv_tokens: every token of every rank to every local expert it can reach,
  // plus alignment padding for each local expert.
  static int32_t DefaultMaxRecvTokens(int32_t num_ranks, int32_t num_experts, int32_t k,
                                      int32_t max_tokens, int32_t expert_alignment) {
    const int64_t local = num_experts / num_ranks;
    const int64_t rows = static_cast<int64_t>(num_ranks) * max_tokens * Min(k, local) +
                         local * (expert_alignment - 1);
    return static_cast<int32_t>(rows);
  }
};

}  // namespace jem
