// The operands and results of every target (cc/ffi/README.md), declared once for both
// platforms: each buffer's name, dtype and per-rank shape (in the Layout's terms), the groups
// they travel in, and each target's groups in call order. handler_checks.h reads and checks a
// call's buffers against them.
#pragma once

#include <cstdint>
#include <tuple>

namespace jem {

// A buffer's dtype: fixed, or the one the AllToAll was created with.
enum class Dtype : uint8_t { kI32, kF32, kDispatch, kCombine };

// Per-rank extents, as cc/ffi/README.md names them.
enum class Dim : uint8_t { kT, kH, kK, kR, kL, kM, kN, kS };

struct Operand {
  const char* name;
  Dtype dtype;
  int rank;
  Dim dims[2];
};

inline constexpr Operand kX{"x", Dtype::kDispatch, 2, {Dim::kT, Dim::kH}};
inline constexpr Operand kXScale{"x_scale", Dtype::kF32, 2, {Dim::kT, Dim::kS}};
inline constexpr Operand kTopkIds{"topk_ids", Dtype::kI32, 2, {Dim::kT, Dim::kK}};
inline constexpr Operand kTopkWeights{"topk_weights", Dtype::kF32, 2, {Dim::kT, Dim::kK}};
inline constexpr Operand kNumTokens{"num_tokens", Dtype::kI32, 0, {}};
inline constexpr Operand kSendTokens{"send_tokens", Dtype::kI32, 1, {Dim::kR}};
inline constexpr Operand kSendIndex{"send_index", Dtype::kI32, 2, {Dim::kT, Dim::kK}};
inline constexpr Operand kExpertX{"expert_x", Dtype::kDispatch, 2, {Dim::kM, Dim::kH}};
inline constexpr Operand kExpertXScale{"expert_x_scale", Dtype::kF32, 2, {Dim::kM, Dim::kS}};
inline constexpr Operand kExpertCounts{"expert_counts", Dtype::kI32, 1, {Dim::kL}};
inline constexpr Operand kGroupSizes{"group_sizes", Dtype::kI32, 1, {Dim::kL}};
inline constexpr Operand kRecvTokens{"recv_tokens", Dtype::kI32, 1, {Dim::kR}};
inline constexpr Operand kRecordRows{"record_rows", Dtype::kI32, 2, {Dim::kN, Dim::kK}};
inline constexpr Operand kRecordWeights{"record_weights", Dtype::kF32, 2, {Dim::kN, Dim::kK}};
inline constexpr Operand kHomeOffsets{"home_offsets", Dtype::kI32, 1, {Dim::kR}};
inline constexpr Operand kSent{"sent", Dtype::kI32, 1, {Dim::kR}};
inline constexpr Operand kExpertY{"expert_y", Dtype::kCombine, 2, {Dim::kM, Dim::kH}};
inline constexpr Operand kOut{"out", Dtype::kCombine, 2, {Dim::kT, Dim::kH}};

// The groups of buffers the targets take and return. Pointers are writable because a group
// may be results of one target and operands of another; operands are only read. Fields()
// hands each pointer with its declaration to `f`, in call order.
namespace operands {

struct DispatchInputs {
  void* x;
  float* x_scale;
  int32_t* topk_ids;
  float* topk_weights;
  int32_t* num_tokens;
  template <typename F>
  void Fields(F&& f) {
    f(x, kX);
    f(x_scale, kXScale);
    f(topk_ids, kTopkIds);
    f(topk_weights, kTopkWeights);
    f(num_tokens, kNumTokens);
  }
};

struct SendHandle {
  int32_t* send_tokens;
  int32_t* send_index;
  template <typename F>
  void Fields(F&& f) {
    f(send_tokens, kSendTokens);
    f(send_index, kSendIndex);
  }
};

struct RecvResults {
  void* expert_x;
  float* expert_x_scale;
  int32_t* expert_counts;
  int32_t* group_sizes;
  template <typename F>
  void Fields(F&& f) {
    f(expert_x, kExpertX);
    f(expert_x_scale, kExpertXScale);
    f(expert_counts, kExpertCounts);
    f(group_sizes, kGroupSizes);
  }
};

struct ExpertHandle {
  int32_t* recv_tokens;
  int32_t* record_rows;
  float* record_weights;
  int32_t* home_offsets;
  template <typename F>
  void Fields(F&& f) {
    f(recv_tokens, kRecvTokens);
    f(record_rows, kRecordRows);
    f(record_weights, kRecordWeights);
    f(home_offsets, kHomeOffsets);
  }
};

struct HomeHandle {
  int32_t* send_tokens;
  int32_t* send_index;
  int32_t* num_tokens;
  template <typename F>
  void Fields(F&& f) {
    f(send_tokens, kSendTokens);
    f(send_index, kSendIndex);
    f(num_tokens, kNumTokens);
  }
};

// Groups of one buffer.
template <typename T, const Operand& kOperand>
struct One {
  T* p;
  template <typename F>
  void Fields(F&& f) {
    f(p, kOperand);
  }
};
using SendTokens = One<int32_t, kSendTokens>;
using Sent = One<int32_t, kSent>;
using ExpertY = One<void, kExpertY>;
using Out = One<void, kOut>;

}  // namespace operands

// The targets: the step name their errors carry, their operand groups and their result
// groups, in the order cc/ffi/README.md (and jax_efa_moe/ops.py) passes them.
namespace target {

template <typename... Groups>
using List = std::tuple<Groups...>;

struct DispatchSend {
  static constexpr const char* kName = "dispatch_send";
  using Args = List<operands::DispatchInputs>;
  using Rets = List<operands::SendHandle>;
};
struct DispatchRecv {
  static constexpr const char* kName = "dispatch_recv";
  using Args = List<operands::SendTokens>;
  using Rets = List<operands::RecvResults, operands::ExpertHandle>;
};
struct Dispatch {
  static constexpr const char* kName = "dispatch";
  using Args = List<operands::DispatchInputs>;
  using Rets = List<operands::SendHandle, operands::RecvResults, operands::ExpertHandle>;
};
struct CombineSend {
  static constexpr const char* kName = "combine_send";
  using Args = List<operands::ExpertY, operands::ExpertHandle>;
  using Rets = List<operands::Sent>;
};
struct CombineRecv {
  static constexpr const char* kName = "combine_recv";
  using Args = List<operands::Sent, operands::HomeHandle>;
  using Rets = List<operands::Out>;
};
struct Combine {
  static constexpr const char* kName = "combine";
  using Args = List<operands::ExpertY, operands::ExpertHandle, operands::HomeHandle>;
  using Rets = List<operands::Out>;
};

}  // namespace target

}  // namespace jem
