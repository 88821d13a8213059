// XLA FFI handlers of the all-to-all targets for platform "CUDA" (the NVLink path). Each
// handler finds the context of the GPU XLA runs it on, turns an error that an earlier
// step's kernels reported into an ffi::Error, checks shapes, and enqueues the kernels on
// XLA's stream (and, for the staged dispatch_send, copies on the context's copy stream joined
// by events): no allocation, no sync, no host wait.
//
// Command buffers: every target is kCmdBufferCompatible. XLA captures a handler's work into
// a CUDA graph (stream capture) when its buffers' addresses change, and replays the graph
// without calling the handler: the checks above then run only when XLA captures. Replays stay
// right because everything a step needs lives in device or mapped memory: step numbers,
// credits, the order of the halves and the error status (nvlink_kernels.h). An error a
// replayed step meets is raised by AllToAll.raise_if_failed(), or by the next call that XLA
// does not replay.
#include "cc/ffi/all_to_all_cuda.h"

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cc/a2a/nvlink_registry.h"
#include "cc/ffi/ffi_types.h"
#include "cc/ffi/handler_checks.h"
#include "cc/ffi/operands.h"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

// The context of XLA's GPU `device`, usable (connected, no earlier failure) and current.
// XLA names the device: cudaStreamGetDevice fails on a stream XLA is capturing.
std::shared_ptr<NvlinkContext> Usable(int device, int64_t id) {
  std::shared_ptr<NvlinkContext> ctx = FindNvlinkContext(id, device);
  if (ctx == nullptr) {
    throw ContextNotFound("no CUDA all-to-all context " + std::to_string(id) + " on GPU " +
                          std::to_string(device) +
                          " (was it created for this device, or closed?).");
  }
  ctx->CheckUsable();
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) cudaSetDevice(device);
  return ctx;
}

// --- the groups as the kernels take them ---

DispatchSendIo SendIo(const operands::DispatchInputs& in, const operands::SendHandle& send) {
  return {in.x,          in.x_scale,       in.topk_ids,      in.topk_weights,
          in.num_tokens, send.send_tokens, send.send_index};
}

DispatchRecvIo RecvIo(const operands::RecvResults& recv, const operands::ExpertHandle& handle) {
  return {recv.expert_x,      recv.expert_x_scale, recv.expert_counts,
          recv.group_sizes,   handle.recv_tokens,  handle.record_rows,
          handle.record_weights, handle.home_offsets};
}

// home_offsets is checked but not needed: over NVLink a partial goes to the home rank's slot
// of (this rank, record), which both sides know without the home rank's count matrix.
CombineSendIo CombineIo(const operands::ExpertY& expert_y, const operands::ExpertHandle& handle,
                        int32_t* sent) {
  return {expert_y.p, handle.recv_tokens, handle.record_rows, handle.record_weights, sent};
}

CombineRecvIo CombineIo(const operands::HomeHandle& home, const operands::Out& out) {
  return {home.send_tokens, home.send_index, home.num_tokens, out.p};
}

// --- the targets, on checked buffers ---

// Staged for the send half, whose caller has other work for the SMs until the recv half; the
// whole ops are one kernel each where they fit (nvlink_kernels.h).
void Run(target::DispatchSend, NvlinkContext& ctx, cudaStream_t stream,
         const operands::DispatchInputs& in, const operands::SendHandle& send) {
  ctx.BeginSend(false, stream);
  ctx.EnqueueDispatchSend(SendIo(in, send), /*staged=*/true, stream);
}

void Run(target::DispatchRecv, NvlinkContext& ctx, cudaStream_t stream,
         const operands::SendTokens&, const operands::RecvResults& recv,
         const operands::ExpertHandle& handle) {
  ctx.BeginRecv(false, stream);
  LaunchDispatchRecv(ctx.args(), RecvIo(recv, handle), stream);
}

void Run(target::Dispatch, NvlinkContext& ctx, cudaStream_t stream,
         const operands::DispatchInputs& in, const operands::SendHandle& send,
         const operands::RecvResults& recv, const operands::ExpertHandle& handle) {
  ctx.BeginSend(false, stream);
  ctx.BeginRecv(false, stream);
  ctx.EnqueueDispatch(SendIo(in, send), RecvIo(recv, handle), stream);
}

void Run(target::CombineSend, NvlinkContext& ctx, cudaStream_t stream,
         const operands::ExpertY& expert_y, const operands::ExpertHandle& handle,
         const operands::Sent& sent) {
  ctx.BeginSend(true, stream);
  LaunchCombineSend(ctx.args(), CombineIo(expert_y, handle, sent.p), stream);
}

void Run(target::CombineRecv, NvlinkContext& ctx, cudaStream_t stream, const operands::Sent&,
         const operands::HomeHandle& home, const operands::Out& out) {
  ctx.BeginRecv(true, stream);
  LaunchCombineRecv(ctx.args(), CombineIo(home, out), stream);
}

void Run(target::Combine, NvlinkContext& ctx, cudaStream_t stream,
         const operands::ExpertY& expert_y, const operands::ExpertHandle& handle,
         const operands::HomeHandle& home, const operands::Out& out) {
  ctx.BeginSend(true, stream);
  ctx.BeginRecv(true, stream);
  LaunchCombine(ctx.args(), CombineIo(expert_y, handle, /*sent=*/nullptr), CombineIo(home, out),
                stream);
}

template <typename Target>
ffi::Error CudaHandler(cudaStream_t stream, int32_t device, int64_t context,
                       ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return RunTarget<Target>([device, context] { return Usable(device, context); }, args, rets,
                           [stream](NvlinkContext& ctx, const auto&... groups) {
                             Run(Target{}, ctx, stream, groups...);
                           });
}

// Every target binds the same: XLA's stream and device, the context id, then its buffers, which
// CudaHandler reads.
inline auto CudaBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Attr<int64_t>("context")
      .RemainingArgs()
      .RemainingRets();
}

}  // namespace
}  // namespace jem

#define JEM_DEFINE_CUDA_HANDLER(Name, python_name)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Jem##Name##Cuda, jem::CudaHandler<jem::target::Name>, \
                                jem::CudaBinding(), {xla::ffi::Traits::kCmdBufferCompatible});
JEM_FFI_TARGETS(JEM_DEFINE_CUDA_HANDLER)
#undef JEM_DEFINE_CUDA_HANDLER
