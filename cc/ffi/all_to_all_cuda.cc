// XLA FFI handlers of the all-to-all targets for platform "CUDA" (the NVLink path). Each
// handler finds the context of the GPU its stream belongs to, turns an error that an earlier
// step's kernels reported into an ffi::Error, checks shapes, and enqueues the kernels on
// XLA's stream (and, for the staged dispatch_send, copies on the context's copy stream joined
// by events): no allocation, no sync, no host wait.
//
// Command buffers: the handlers are not marked kCmdBufferCompatible, so XLA never captures
// them into CUDA graphs and every step passes through the checks above. The kernels themselves
// would replay correctly (step numbers live in device memory), which is what would let a
// future version opt in.
#include "cc/ffi/all_to_all_cuda.h"

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "cc/a2a/nvlink_registry.h"
#include "cc/ffi/ffi_types.h"
#include "cc/ffi/handler_checks.h"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using Stream = ffi::PlatformStream<cudaStream_t>;

// The context of this stream's GPU, usable (no earlier failure) and current; null with
// `error` set otherwise.
std::shared_ptr<NvlinkContext> Usable(cudaStream_t stream, int64_t id, const char* step,
                                      ffi::Error& error) {
  int device = -1;
  if (cudaStreamGetDevice(stream, &device) != cudaSuccess) {
    cudaGetLastError();
    error = ffi::Error::Internal(std::string(step) + ": cannot tell the GPU of XLA's stream.");
    return nullptr;
  }
  std::shared_ptr<NvlinkContext> ctx = FindNvlinkContext(id, device);
  if (ctx == nullptr) {
    error = ffi::Error::InvalidArgument(
        std::string(step) + ": no CUDA all-to-all context " + std::to_string(id) + " on GPU " +
        std::to_string(device) + " (was it created for this device, or closed?).");
    return nullptr;
  }
  const std::string failure = ctx->Failure();
  if (!failure.empty()) {
    error = ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                       std::string(step) + ": the all-to-all context failed earlier: " + failure);
    return nullptr;
  }
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) cudaSetDevice(device);
  return ctx;
}

ffi::Error Launched(cudaError_t err, const char* step) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(step) + ": kernel launch failed: " +
                              cudaGetErrorString(err));
}

ffi::Error Misuse(const std::string& text, const char* step) {
  if (text.empty()) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition, std::string(step) + ": " + text);
}

// ---------------------------------------------------------------- dispatch

ffi::Error CheckSendOperands(const Layout& l, const AnyBuffer& x, const F32Buffer& x_scale,
                             const I32Buffer& topk_ids, const F32Buffer& topk_weights,
                             const I32Buffer& num_tokens, I32Result& send_tokens,
                             I32Result& send_index) {
  const int64_t T = l.max_tokens, H = l.hidden, k = l.experts_per_token, S = l.num_scales();
  return FirstProblem({
      CheckElementBytes("x", x.element_type(), l.dispatch_elem_bytes),
      CheckDims("x", x.dimensions(), {T, H}),
      CheckDims("x_scale", x_scale.dimensions(), {T, S}),
      CheckDims("topk_ids", topk_ids.dimensions(), {T, k}),
      CheckDims("topk_weights", topk_weights.dimensions(), {T, k}),
      CheckDims("num_tokens", num_tokens.dimensions(), {}),
      CheckDims("send_tokens", send_tokens->dimensions(), {l.num_ranks}),
      CheckDims("send_index", send_index->dimensions(), {T, k}),
  });
}

ffi::Error CheckRecvResults(const Layout& l, const I32Buffer* send_tokens, AnyResult& expert_x,
                            F32Result& expert_x_scale, I32Result& expert_counts,
                            I32Result& group_sizes, I32Result& recv_tokens,
                            I32Result& record_rows, F32Result& record_weights,
                            I32Result& home_offsets) {
  const int64_t M = l.max_recv_tokens, H = l.hidden, k = l.experts_per_token;
  const int64_t N = l.max_recv_records(), L = l.local_experts(), S = l.num_scales();
  return FirstProblem({
      send_tokens ? CheckDims("send_tokens", send_tokens->dimensions(), {l.num_ranks})
                  : std::string(),
      CheckElementBytes("expert_x", expert_x->element_type(), l.dispatch_elem_bytes),
      CheckDims("expert_x", expert_x->dimensions(), {M, H}),
      CheckDims("expert_x_scale", expert_x_scale->dimensions(), {M, S}),
      CheckDims("expert_counts", expert_counts->dimensions(), {L}),
      CheckDims("group_sizes", group_sizes->dimensions(), {L}),
      CheckDims("recv_tokens", recv_tokens->dimensions(), {l.num_ranks}),
      CheckDims("record_rows", record_rows->dimensions(), {N, k}),
      CheckDims("record_weights", record_weights->dimensions(), {N, k}),
      CheckDims("home_offsets", home_offsets->dimensions(), {l.num_ranks}),
  });
}

// Staged for the send half, whose caller has other work for the SMs until the recv half;
// direct for the whole op.
ffi::Error EnqueueDispatchSend(NvlinkContext& ctx, cudaStream_t stream, bool staged,
                               const AnyBuffer& x, const F32Buffer& x_scale,
                               const I32Buffer& topk_ids, const F32Buffer& topk_weights,
                               const I32Buffer& num_tokens, I32Result& send_tokens,
                               I32Result& send_index) {
  const DispatchSendIo io{x.untyped_data(),     x_scale.typed_data(),
                          topk_ids.typed_data(), topk_weights.typed_data(),
                          num_tokens.typed_data(), send_tokens->typed_data(),
                          send_index->typed_data()};
  return Launched(ctx.EnqueueDispatchSend(io, staged, stream), "dispatch_send");
}

ffi::Error EnqueueDispatchRecv(NvlinkContext& ctx, cudaStream_t stream, AnyResult& expert_x,
                               F32Result& expert_x_scale, I32Result& expert_counts,
                               I32Result& group_sizes, I32Result& recv_tokens,
                               I32Result& record_rows, F32Result& record_weights,
                               I32Result& home_offsets) {
  const DispatchRecvIo io{expert_x->untyped_data(),   expert_x_scale->typed_data(),
                          expert_counts->typed_data(), group_sizes->typed_data(),
                          recv_tokens->typed_data(),   record_rows->typed_data(),
                          record_weights->typed_data(), home_offsets->typed_data()};
  return Launched(LaunchDispatchRecv(ctx.args(), io, stream), "dispatch_recv");
}

ffi::Error DispatchSendCuda(cudaStream_t stream, int64_t context, AnyBuffer x, F32Buffer x_scale,
                            I32Buffer topk_ids, F32Buffer topk_weights, I32Buffer num_tokens,
                            I32Result send_tokens, I32Result send_index) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "dispatch_send", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckSendOperands(c.layout(), x, x_scale, topk_ids, topk_weights, num_tokens,
                                 send_tokens, send_index);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginSend(false), "dispatch_send"); e.failure()) return e;
  return EnqueueDispatchSend(c, stream, /*staged=*/true, x, x_scale, topk_ids, topk_weights,
                             num_tokens, send_tokens, send_index);
}

ffi::Error DispatchRecvCuda(cudaStream_t stream, int64_t context, I32Buffer send_tokens,
                            AnyResult expert_x, F32Result expert_x_scale,
                            I32Result expert_counts, I32Result group_sizes,
                            I32Result recv_tokens, I32Result record_rows,
                            F32Result record_weights, I32Result home_offsets) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "dispatch_recv", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckRecvResults(c.layout(), &send_tokens, expert_x, expert_x_scale,
                                expert_counts, group_sizes, recv_tokens, record_rows,
                                record_weights, home_offsets);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginRecv(false), "dispatch_recv"); e.failure()) return e;
  return EnqueueDispatchRecv(c, stream, expert_x, expert_x_scale, expert_counts, group_sizes,
                             recv_tokens, record_rows, record_weights, home_offsets);
}

ffi::Error DispatchCuda(cudaStream_t stream, int64_t context, AnyBuffer x, F32Buffer x_scale,
                        I32Buffer topk_ids, F32Buffer topk_weights, I32Buffer num_tokens,
                        I32Result send_tokens, I32Result send_index, AnyResult expert_x,
                        F32Result expert_x_scale, I32Result expert_counts,
                        I32Result group_sizes, I32Result recv_tokens, I32Result record_rows,
                        F32Result record_weights, I32Result home_offsets) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "dispatch", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckSendOperands(c.layout(), x, x_scale, topk_ids, topk_weights, num_tokens,
                                 send_tokens, send_index);
      e.failure()) {
    return e;
  }
  if (auto e = CheckRecvResults(c.layout(), nullptr, expert_x, expert_x_scale, expert_counts,
                                group_sizes, recv_tokens, record_rows, record_weights,
                                home_offsets);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginSend(false), "dispatch"); e.failure()) return e;
  c.BeginRecv(false);
  if (auto e = EnqueueDispatchSend(c, stream, /*staged=*/false, x, x_scale, topk_ids,
                                   topk_weights, num_tokens, send_tokens, send_index);
      e.failure()) {
    return e;
  }
  return EnqueueDispatchRecv(c, stream, expert_x, expert_x_scale, expert_counts, group_sizes,
                             recv_tokens, record_rows, record_weights, home_offsets);
}

// ---------------------------------------------------------------- combine

ffi::Error CheckCombineSendOperands(const Layout& l, const AnyBuffer& expert_y,
                                    const I32Buffer& recv_tokens, const I32Buffer& record_rows,
                                    const F32Buffer& record_weights,
                                    const I32Buffer& home_offsets, I32Result* sent) {
  const int64_t M = l.max_recv_tokens, H = l.hidden, k = l.experts_per_token;
  const int64_t N = l.max_recv_records();
  return FirstProblem({
      CheckElementBytes("expert_y", expert_y.element_type(), l.combine_elem_bytes),
      CheckDims("expert_y", expert_y.dimensions(), {M, H}),
      CheckDims("recv_tokens", recv_tokens.dimensions(), {l.num_ranks}),
      CheckDims("record_rows", record_rows.dimensions(), {N, k}),
      CheckDims("record_weights", record_weights.dimensions(), {N, k}),
      CheckDims("home_offsets", home_offsets.dimensions(), {l.num_ranks}),
      sent ? CheckDims("sent", (*sent)->dimensions(), {l.num_ranks}) : std::string(),
  });
}

ffi::Error CheckCombineRecvOperands(const Layout& l, const I32Buffer* sent,
                                    const I32Buffer& send_tokens, const I32Buffer& send_index,
                                    const I32Buffer& num_tokens, AnyResult& out) {
  const int64_t T = l.max_tokens, H = l.hidden, k = l.experts_per_token;
  return FirstProblem({
      sent ? CheckDims("sent", sent->dimensions(), {l.num_ranks}) : std::string(),
      CheckDims("send_tokens", send_tokens.dimensions(), {l.num_ranks}),
      CheckDims("send_index", send_index.dimensions(), {T, k}),
      CheckDims("num_tokens", num_tokens.dimensions(), {}),
      CheckElementBytes("out", out->element_type(), l.combine_elem_bytes),
      CheckDims("out", out->dimensions(), {T, H}),
  });
}

ffi::Error EnqueueCombineSend(NvlinkContext& ctx, cudaStream_t stream, const AnyBuffer& expert_y,
                              const I32Buffer& recv_tokens, const I32Buffer& record_rows,
                              const F32Buffer& record_weights, int32_t* sent) {
  const CombineSendIo io{expert_y.untyped_data(), recv_tokens.typed_data(),
                         record_rows.typed_data(), record_weights.typed_data(), sent};
  return Launched(LaunchCombineSend(ctx.args(), io, stream), "combine_send");
}

ffi::Error EnqueueCombineRecv(NvlinkContext& ctx, cudaStream_t stream,
                              const I32Buffer& send_tokens, const I32Buffer& send_index,
                              const I32Buffer& num_tokens, AnyResult& out) {
  const CombineRecvIo io{send_tokens.typed_data(), send_index.typed_data(),
                         num_tokens.typed_data(), out->untyped_data()};
  return Launched(LaunchCombineRecv(ctx.args(), io, stream), "combine_recv");
}

// home_offsets is checked but not needed: over NVLink a partial goes to the home rank's slot
// of (this rank, record), which both sides know without the home rank's count matrix.
ffi::Error CombineSendCuda(cudaStream_t stream, int64_t context, AnyBuffer expert_y,
                           I32Buffer recv_tokens, I32Buffer record_rows, F32Buffer record_weights,
                           I32Buffer home_offsets, I32Result sent) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "combine_send", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckCombineSendOperands(c.layout(), expert_y, recv_tokens, record_rows,
                                        record_weights, home_offsets, &sent);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginSend(true), "combine_send"); e.failure()) return e;
  return EnqueueCombineSend(c, stream, expert_y, recv_tokens, record_rows, record_weights,
                            sent->typed_data());
}

ffi::Error CombineRecvCuda(cudaStream_t stream, int64_t context, I32Buffer sent,
                           I32Buffer send_tokens, I32Buffer send_index, I32Buffer num_tokens,
                           AnyResult out) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "combine_recv", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckCombineRecvOperands(c.layout(), &sent, send_tokens, send_index, num_tokens,
                                        out);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginRecv(true), "combine_recv"); e.failure()) return e;
  return EnqueueCombineRecv(c, stream, send_tokens, send_index, num_tokens, out);
}

ffi::Error CombineCuda(cudaStream_t stream, int64_t context, AnyBuffer expert_y,
                       I32Buffer recv_tokens, I32Buffer record_rows, F32Buffer record_weights,
                       I32Buffer home_offsets, I32Buffer send_tokens, I32Buffer send_index, I32Buffer num_tokens,
                       AnyResult out) {
  ffi::Error error;
  const auto ctx = Usable(stream, context, "combine", error);
  if (ctx == nullptr) return error;
  NvlinkContext& c = *ctx;
  if (auto e = CheckCombineSendOperands(c.layout(), expert_y, recv_tokens, record_rows,
                                        record_weights, home_offsets, nullptr);
      e.failure()) {
    return e;
  }
  if (auto e = CheckCombineRecvOperands(c.layout(), nullptr, send_tokens, send_index, num_tokens,
                                        out);
      e.failure()) {
    return e;
  }
  if (auto e = Misuse(c.BeginSend(true), "combine"); e.failure()) return e;
  c.BeginRecv(true);
  if (auto e = EnqueueCombineSend(c, stream, expert_y, recv_tokens, record_rows, record_weights,
                                  /*sent=*/nullptr);
      e.failure()) {
    return e;
  }
  return EnqueueCombineRecv(c, stream, send_tokens, send_index, num_tokens, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchSendCuda, DispatchSendCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<AnyBuffer>()   // x
                                  .Arg<F32Buffer>()   // x_scale
                                  .Arg<I32Buffer>()   // topk_ids
                                  .Arg<F32Buffer>()   // topk_weights
                                  .Arg<I32Buffer>()   // num_tokens
                                  .Ret<I32Buffer>()   // send_tokens
                                  .Ret<I32Buffer>()); // send_index

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchRecvCuda, DispatchRecvCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<I32Buffer>()   // send_tokens
                                  .Ret<AnyBuffer>()   // expert_x
                                  .Ret<F32Buffer>()   // expert_x_scale
                                  .Ret<I32Buffer>()   // expert_counts
                                  .Ret<I32Buffer>()   // group_sizes
                                  .Ret<I32Buffer>()   // recv_tokens
                                  .Ret<I32Buffer>()   // record_rows
                                  .Ret<F32Buffer>()   // record_weights
                                  .Ret<I32Buffer>()); // home_offsets

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchCuda, DispatchCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<AnyBuffer>()   // x
                                  .Arg<F32Buffer>()   // x_scale
                                  .Arg<I32Buffer>()   // topk_ids
                                  .Arg<F32Buffer>()   // topk_weights
                                  .Arg<I32Buffer>()   // num_tokens
                                  .Ret<I32Buffer>()   // send_tokens
                                  .Ret<I32Buffer>()   // send_index
                                  .Ret<AnyBuffer>()   // expert_x
                                  .Ret<F32Buffer>()   // expert_x_scale
                                  .Ret<I32Buffer>()   // expert_counts
                                  .Ret<I32Buffer>()   // group_sizes
                                  .Ret<I32Buffer>()   // recv_tokens
                                  .Ret<I32Buffer>()   // record_rows
                                  .Ret<F32Buffer>()   // record_weights
                                  .Ret<I32Buffer>()); // home_offsets

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineSendCuda, CombineSendCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<AnyBuffer>()   // expert_y
                                  .Arg<I32Buffer>()   // recv_tokens
                                  .Arg<I32Buffer>()   // record_rows
                                  .Arg<F32Buffer>()   // record_weights
                                  .Arg<I32Buffer>()   // home_offsets
                                  .Ret<I32Buffer>()); // sent

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineRecvCuda, CombineRecvCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<I32Buffer>()   // sent
                                  .Arg<I32Buffer>()   // send_tokens
                                  .Arg<I32Buffer>()   // send_index
                                  .Arg<I32Buffer>()   // num_tokens
                                  .Ret<AnyBuffer>()); // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineCuda, CombineCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<Stream>()
                                  .Attr<int64_t>("context")
                                  .Arg<AnyBuffer>()   // expert_y
                                  .Arg<I32Buffer>()   // recv_tokens
                                  .Arg<I32Buffer>()   // record_rows
                                  .Arg<F32Buffer>()   // record_weights
                                  .Arg<I32Buffer>()   // home_offsets
                                  .Arg<I32Buffer>()   // send_tokens
                                  .Arg<I32Buffer>()   // send_index
                                  .Arg<I32Buffer>()   // num_tokens
                                  .Ret<AnyBuffer>()); // out

}  // namespace jem
