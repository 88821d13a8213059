// Launchers of the CUDA dispatch/combine kernels of the NVLink path (cc/base/nvlink_layout.h).
// Each enqueues one kernel on `stream` and returns at once: no allocation, no sync; a failed
// launch throws CudaError. The kernels keep every step number in device memory, so a CUDA graph
// that captured them replays correctly. A kernel that meets bad input, a full buffer, a silent
// peer or a half out of order (a recv with no send before it, a send twice) records it in the
// rank's sticky DeviceStatus and writes nothing out of bounds. Bad input and a full buffer it
// still announces to its peers, which fail in the same step; after any other error the rank
// raises no more flags (device_utils.cuh, Silent), so that no rank hangs or reads stale data.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cc/base/nvlink_layout.h"
#include "cc/base/device_status.h"
#include "cc/kernels/fast_div.h"

namespace jem {

// A CUDA call of the NVLink path that failed (set-up, a launch, a copy): not the caller's to
// fix.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A layout too large for the kernels on this GPU (their shared memory per block): the caller's
// to fix, with a smaller one.
class LayoutError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Throws CudaError "<what> failed: <CUDA's words>" unless `err` is cudaSuccess.
inline void CheckCuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw CudaError(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
}

// The layout's numbers the kernels divide by inside their loops.
struct NvlinkDivisors {
  FastDiv k;              // experts per token
  FastDiv local_experts;  // L
  FastDiv ranks;          // R
  FastDiv ranks_k;        // R * k
  FastDiv x_vecs;         // 16-byte vectors of a token's x
  FastDiv scales;         // scales per token (1 where there are none)
  FastDiv route_entry;    // 1 + L ints
  FastDiv route_row;      // R * (1 + L) ints
  FastDiv combine_vecs;   // 16-byte vectors of a combine row
  FastDiv alignment;      // expert_alignment

  NvlinkDivisors() = default;
  explicit NvlinkDivisors(const Layout& l)
      : k(l.experts_per_token),
        local_experts(l.local_experts()),
        ranks(l.num_ranks),
        ranks_k(l.num_ranks * l.experts_per_token),
        x_vecs(l.x_bytes() / 16),
        scales(l.num_scales() > 0 ? l.num_scales() : 1),
        route_entry(l.route_entry_ints()),
        route_row(l.route_row_ints()),
        combine_vecs(l.combine_row_bytes() / 16),
        alignment(l.expert_alignment) {}
};

// What every kernel of one rank needs: the layout, who it is, every NVLink peer's arena as
// mapped on this rank's device (its own at arenas[rank]), and how fabric peers are reached.
struct NvlinkArgs {
  Layout layout;
  NvlinkDivisors div;  // of the layout
  ArenaOffsets offsets;  // of NvlinkLayout{layout}
  int32_t rank = 0;
  int32_t num_sms = 0;  // SMs of the device
  int32_t max_sms = 0;  // SMs each kernel may occupy (the SM budget; 0: every SM)
  uint64_t timeout_ns = 0;
  bool zero_unused_rows = true;  // zero the rows of expert_x past the last group
  bool one_kernel_ops = false;   // whole ops as one kernel each (LoadNvlinkKernels)
  DeviceStatus* status = nullptr;  // mapped pinned host memory
  uint8_t* arenas[kMaxNvlinkRanks] = {};  // null for fabric peers
  // Fabric peers (bit r = rank r is on another node): the kernels pack what goes to them into
  // outboxes of the fabric buffer and tell the proxy through the mailbox; what they write
  // lands in the fabric buffer, and the proxy raises their flags in fabric_signals.
  uint64_t fabric_mask = 0;
  // NVLink peers on this very GPU (ranks that share one GPU as processes): a staged send
  // stores to them directly, since a copy engine of this process may not run while their
  // kernels spin on the same GPU.
  uint64_t same_gpu_mask = 0;
  uint8_t* fabric_buffer = nullptr;   // laid out like the arena (nvlink_layout.h)
  uint8_t* fabric_signals = nullptr;  // mapped pinned host, laid out like the signals region
  ProxyMailbox* mailbox = nullptr;    // mapped pinned host
  // Where the kernels' phases end, for nvlink_context_test --phases (null otherwise):
  // [block][Phase], the %globaltimer when thread 0 of the block got there.
  uint64_t* phase_clock = nullptr;
};

// The phases a step's kernels stamp into NvlinkArgs::phase_clock, in the order they run.
enum Phase : int {
  kDispatchStart,
  kDispatchCounted,   // every token counted, the credits in
  kDispatchRanked,    // record indices, slot ranks and send_index of the block's tokens
  kDispatchPacked,    // the block's records stored
  kDispatchSent,      // past the send half's block ticket
  kDispatchRouted,    // every route row's flag seen, the table folded, the expert offsets scanned
  kDispatchArrived,   // every sender's ready flag seen
  kDispatchExpanded,  // the block's records expanded into expert_x
  kDispatchZeroed,    // padding (and unused) rows zeroed
  kDispatchEnd,       // the end: past the recv half's block ticket, where it has one
  kCombineStart,
  kCombineCredited,   // the block's slots read, the credits in
  kCombineSummed,     // the block's partials stored
  kCombineSent,       // past the send half's block ticket
  kCombineArrived,    // the partials' places found, every expert rank's ready flag seen
  kCombineReduced,    // the block's tokens summed
  kCombineEnd,        // the end, as for dispatch
  kNumPhases
};

struct DispatchSendIo {
  const void* x;              // [T, H] dispatch dtype
  const float* x_scale;       // [T, S]
  const int32_t* topk_ids;    // [T, k]
  const float* topk_weights;  // [T, k]
  const int32_t* num_tokens;  // []
  int32_t* send_tokens;       // [R]
  int32_t* send_index;        // [T, k]
};

struct DispatchRecvIo {
  void* expert_x;             // [M, H] dispatch dtype
  float* expert_x_scale;      // [M, S]
  int32_t* expert_counts;     // [L]
  int32_t* group_sizes;       // [L]
  int32_t* recv_tokens;       // [R]
  int32_t* record_rows;       // [N, k]
  float* record_weights;      // [N, k]
  int32_t* home_offsets;      // [R]
};

struct CombineSendIo {
  const void* expert_y;          // [M, H] combine dtype
  const int32_t* recv_tokens;    // [R]
  const int32_t* record_rows;    // [N, k]
  const float* record_weights;   // [N, k]
  int32_t* sent;                 // [R], or null (the fused combine has no such result)
};

struct CombineRecvIo {
  const int32_t* send_tokens;  // [R]
  const int32_t* send_index;   // [T, k]
  const int32_t* num_tokens;   // []
  void* out;                   // [T, H] combine dtype
};

// Loads every kernel on the current device, and throws LayoutError if one needs more shared
// memory per block than the device gives. Call once per context at set-up: with CUDA's lazy
// module loading, a kernel loaded at its first launch may wait for the device to go idle,
// while a kernel already running on it waits for a peer whose launch comes after. Returns
// whether the whole op's kernel fits on the device at once (every block resident).
bool LoadDispatch(const NvlinkArgs& args);
bool LoadCombine(const NvlinkArgs& args);
// Whether whole ops may run as one kernel each (one_kernel_ops).
inline bool LoadNvlinkKernels(const NvlinkArgs& args) {
  const bool dispatch = LoadDispatch(args);
  return LoadCombine(args) && dispatch;
}

// staged: peers' records go to this rank's outboxes (nvlink_layout.h), for the copy engine.
void LaunchDispatchSend(const NvlinkArgs& args, const DispatchSendIo& io, bool staged,
                        cudaStream_t stream);
void LaunchDispatchRecv(const NvlinkArgs& args, const DispatchRecvIo& io, cudaStream_t stream);
void LaunchCombineSend(const NvlinkArgs& args, const CombineSendIo& io, cudaStream_t stream);
void LaunchCombineRecv(const NvlinkArgs& args, const CombineRecvIo& io, cudaStream_t stream);
// The whole ops: one kernel each where args.one_kernel_ops, else the direct send half and the
// recv half.
void LaunchDispatch(const NvlinkArgs& args, const DispatchSendIo& send, const DispatchRecvIo& recv,
                    cudaStream_t stream);
void LaunchCombine(const NvlinkArgs& args, const CombineSendIo& send, const CombineRecvIo& recv,
                   cudaStream_t stream);

}  // namespace jem
