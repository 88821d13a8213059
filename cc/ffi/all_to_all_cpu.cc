// XLA FFI handlers for platform "cpu": every target of cc/ffi/README.md, driving the host
// protocol steps (cc/a2a) for the context named by the `context` attribute.
#include "cc/ffi/all_to_all_cpu.h"

#include <memory>
#include <string>

#include "cc/a2a/combine_step.h"
#include "cc/a2a/context_registry.h"
#include "cc/a2a/dispatch_step.h"
#include "cc/ffi/ffi_types.h"
#include "cc/ffi/handler_checks.h"

namespace jem {
namespace {

ffi::ErrorOr<std::shared_ptr<AllToAllContext>> LookUp(int64_t context) {
  std::shared_ptr<AllToAllContext> ctx = FindContext(context);
  if (!ctx) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "no all-to-all context with id " + std::to_string(context) +
        " in this process: the AllToAll was closed, or was created in another process."));
  }
  return ctx;
}

// --- shape checks against the context's layout ---

ffi::Error CheckDispatchOperands(const Layout& l, AnyBuffer x, F32Buffer x_scale,
                                 I32Buffer topk_ids, F32Buffer topk_weights,
                                 I32Buffer num_tokens) {
  const int64_t T = l.max_tokens, k = l.experts_per_token;
  return FirstProblem({
      CheckDims("x", x.dimensions(), {T, l.hidden}),
      CheckElementBytes("x", x.element_type(), l.dispatch_elem_bytes),
      CheckDims("x_scale", x_scale.dimensions(), {T, l.num_scales()}),
      CheckDims("topk_ids", topk_ids.dimensions(), {T, k}),
      CheckDims("topk_weights", topk_weights.dimensions(), {T, k}),
      CheckDims("num_tokens", num_tokens.dimensions(), {}),
  });
}

ffi::Error CheckSendHandle(const Layout& l, ffi::Span<const int64_t> send_tokens,
                           ffi::Span<const int64_t> send_index) {
  return FirstProblem({
      CheckDims("send_tokens", send_tokens, {l.num_ranks}),
      CheckDims("send_index", send_index, {l.max_tokens, l.experts_per_token}),
  });
}

ffi::Error CheckRecvResults(const Layout& l, AnyResult& expert_x, F32Result& expert_x_scale,
                            I32Result& expert_counts, I32Result& group_sizes,
                            I32Result& recv_tokens, I32Result& record_rows,
                            F32Result& record_weights, I32Result& home_offsets) {
  const int64_t M = l.max_recv_tokens, N = l.max_recv_records(), k = l.experts_per_token;
  return FirstProblem({
      CheckDims("expert_x", expert_x->dimensions(), {M, l.hidden}),
      CheckElementBytes("expert_x", expert_x->element_type(), l.dispatch_elem_bytes),
      CheckDims("expert_x_scale", expert_x_scale->dimensions(), {M, l.num_scales()}),
      CheckDims("expert_counts", expert_counts->dimensions(), {l.local_experts()}),
      CheckDims("group_sizes", group_sizes->dimensions(), {l.local_experts()}),
      CheckDims("recv_tokens", recv_tokens->dimensions(), {l.num_ranks}),
      CheckDims("record_rows", record_rows->dimensions(), {N, k}),
      CheckDims("record_weights", record_weights->dimensions(), {N, k}),
      CheckDims("home_offsets", home_offsets->dimensions(), {l.num_ranks}),
  });
}

ffi::Error CheckExpertHandle(const Layout& l, AnyBuffer expert_y, I32Buffer recv_tokens,
                             I32Buffer record_rows, F32Buffer record_weights,
                             I32Buffer home_offsets) {
  const int64_t N = l.max_recv_records(), k = l.experts_per_token;
  return FirstProblem({
      CheckDims("expert_y", expert_y.dimensions(), {l.max_recv_tokens, l.hidden}),
      CheckElementBytes("expert_y", expert_y.element_type(), l.combine_elem_bytes),
      CheckDims("recv_tokens", recv_tokens.dimensions(), {l.num_ranks}),
      CheckDims("record_rows", record_rows.dimensions(), {N, k}),
      CheckDims("record_weights", record_weights.dimensions(), {N, k}),
      CheckDims("home_offsets", home_offsets.dimensions(), {l.num_ranks}),
  });
}

ffi::Error CheckHomeHandle(const Layout& l, I32Buffer send_tokens, I32Buffer send_index,
                           I32Buffer num_tokens, AnyResult& out) {
  return FirstProblem({
      CheckDims("send_tokens", send_tokens.dimensions(), {l.num_ranks}),
      CheckDims("send_index", send_index.dimensions(), {l.max_tokens, l.experts_per_token}),
      CheckDims("num_tokens", num_tokens.dimensions(), {}),
      CheckDims("out", out->dimensions(), {l.max_tokens, l.hidden}),
      CheckElementBytes("out", out->element_type(), l.combine_elem_bytes),
  });
}

// --- the steps, on checked operands ---

ffi::Error RunDispatchSend(AllToAllContext& ctx, AnyBuffer x, F32Buffer x_scale,
                           I32Buffer topk_ids, F32Buffer topk_weights, I32Buffer num_tokens,
                           I32Result& send_tokens, I32Result& send_index) {
  const Layout& l = ctx.layout();
  if (ffi::Error e = CheckDispatchOperands(l, x, x_scale, topk_ids, topk_weights, num_tokens);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckSendHandle(l, send_tokens->dimensions(), send_index->dimensions());
      e.failure()) {
    return e;
  }
  DispatchInput input;
  input.x = x.untyped_data();
  input.x_scale = x_scale.typed_data();
  input.topk_ids = topk_ids.typed_data();
  input.topk_weights = topk_weights.typed_data();
  input.num_tokens = *num_tokens.typed_data();
  try {
    DispatchSend(ctx, input, send_tokens->typed_data(), send_index->typed_data());
  } catch (const std::exception& e) {
    return ToFfiError(e);
  }
  return ffi::Error::Success();
}

ffi::Error RunDispatchRecv(AllToAllContext& ctx, const int32_t* send_tokens,
                           AnyResult& expert_x, F32Result& expert_x_scale,
                           I32Result& expert_counts, I32Result& group_sizes,
                           I32Result& recv_tokens, I32Result& record_rows,
                           F32Result& record_weights, I32Result& home_offsets) {
  if (ffi::Error e = CheckRecvResults(ctx.layout(), expert_x, expert_x_scale, expert_counts,
                                      group_sizes, recv_tokens, record_rows, record_weights,
                                      home_offsets);
      e.failure()) {
    return e;
  }
  ExpertLayout out;
  out.expert_x = expert_x->untyped_data();
  out.expert_x_scale = expert_x_scale->typed_data();
  out.expert_counts = expert_counts->typed_data();
  out.group_sizes = group_sizes->typed_data();
  out.recv_tokens = recv_tokens->typed_data();
  out.record_rows = record_rows->typed_data();
  out.record_weights = record_weights->typed_data();
  try {
    DispatchRecv(ctx, send_tokens, out, home_offsets->typed_data());
  } catch (const std::exception& e) {
    return ToFfiError(e);
  }
  return ffi::Error::Success();
}

ffi::Error RunCombineSend(AllToAllContext& ctx, AnyBuffer expert_y, I32Buffer recv_tokens,
                          I32Buffer record_rows, F32Buffer record_weights,
                          I32Buffer home_offsets, int32_t* sent) {
  if (ffi::Error e = CheckExpertHandle(ctx.layout(), expert_y, recv_tokens, record_rows,
                                       record_weights, home_offsets);
      e.failure()) {
    return e;
  }
  ExpertHandle handle;
  handle.recv_tokens = recv_tokens.typed_data();
  handle.record_rows = record_rows.typed_data();
  handle.record_weights = record_weights.typed_data();
  handle.home_offsets = home_offsets.typed_data();
  try {
    CombineSend(ctx, expert_y.untyped_data(), handle, sent);
  } catch (const std::exception& e) {
    return ToFfiError(e);
  }
  return ffi::Error::Success();
}

ffi::Error RunCombineRecv(AllToAllContext& ctx, I32Buffer send_tokens, I32Buffer send_index,
                          I32Buffer num_tokens, AnyResult& out) {
  if (ffi::Error e = CheckHomeHandle(ctx.layout(), send_tokens, send_index, num_tokens, out);
      e.failure()) {
    return e;
  }
  HomeHandle handle;
  handle.send_tokens = send_tokens.typed_data();
  handle.send_index = send_index.typed_data();
  handle.num_tokens = *num_tokens.typed_data();
  try {
    CombineRecv(ctx, handle, out->untyped_data());
  } catch (const std::exception& e) {
    return ToFfiError(e);
  }
  return ffi::Error::Success();
}

// --- the targets ---

ffi::Error DispatchSendImpl(int64_t context, AnyBuffer x, F32Buffer x_scale, I32Buffer topk_ids,
                            F32Buffer topk_weights, I32Buffer num_tokens,
                            I32Result send_tokens, I32Result send_index) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  return RunDispatchSend(**ctx, x, x_scale, topk_ids, topk_weights, num_tokens, send_tokens,
                         send_index);
}

ffi::Error DispatchRecvImpl(int64_t context, I32Buffer send_tokens, AnyResult expert_x,
                            F32Result expert_x_scale, I32Result expert_counts,
                            I32Result group_sizes, I32Result recv_tokens,
                            I32Result record_rows, F32Result record_weights,
                            I32Result home_offsets) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  if (ffi::Error e = FirstProblem({CheckDims("send_tokens", send_tokens.dimensions(),
                                             {(*ctx)->layout().num_ranks})});
      e.failure()) {
    return e;
  }
  return RunDispatchRecv(**ctx, send_tokens.typed_data(), expert_x, expert_x_scale,
                         expert_counts, group_sizes, recv_tokens, record_rows, record_weights,
                         home_offsets);
}

ffi::Error DispatchImpl(int64_t context, AnyBuffer x, F32Buffer x_scale, I32Buffer topk_ids,
                        F32Buffer topk_weights, I32Buffer num_tokens, I32Result send_tokens,
                        I32Result send_index, AnyResult expert_x, F32Result expert_x_scale,
                        I32Result expert_counts, I32Result group_sizes, I32Result recv_tokens,
                        I32Result record_rows, F32Result record_weights,
                        I32Result home_offsets) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  if (ffi::Error e = RunDispatchSend(**ctx, x, x_scale, topk_ids, topk_weights, num_tokens,
                                     send_tokens, send_index);
      e.failure()) {
    return e;
  }
  return RunDispatchRecv(**ctx, send_tokens->typed_data(), expert_x, expert_x_scale,
                         expert_counts, group_sizes, recv_tokens, record_rows, record_weights,
                         home_offsets);
}

ffi::Error CombineSendImpl(int64_t context, AnyBuffer expert_y, I32Buffer recv_tokens,
                           I32Buffer record_rows, F32Buffer record_weights,
                           I32Buffer home_offsets, I32Result sent) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  if (ffi::Error e = FirstProblem({CheckDims("sent", sent->dimensions(),
                                             {(*ctx)->layout().num_ranks})});
      e.failure()) {
    return e;
  }
  return RunCombineSend(**ctx, expert_y, recv_tokens, record_rows, record_weights,
                        home_offsets, sent->typed_data());
}

ffi::Error CombineRecvImpl(int64_t context, I32Buffer sent, I32Buffer send_tokens,
                           I32Buffer send_index, I32Buffer num_tokens, AnyResult out) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  if (ffi::Error e = FirstProblem({CheckDims("sent", sent.dimensions(),
                                             {(*ctx)->layout().num_ranks})});
      e.failure()) {
    return e;
  }
  return RunCombineRecv(**ctx, send_tokens, send_index, num_tokens, out);
}

ffi::Error CombineImpl(int64_t context, AnyBuffer expert_y, I32Buffer recv_tokens,
                       I32Buffer record_rows, F32Buffer record_weights, I32Buffer home_offsets,
                       I32Buffer send_tokens, I32Buffer send_index, I32Buffer num_tokens,
                       AnyResult out) {
  auto ctx = LookUp(context);
  if (ctx.has_error()) return ctx.error();
  // The sent counts only order the two halves; here they run back to back.
  std::vector<int32_t> sent((*ctx)->layout().num_ranks);
  if (ffi::Error e = RunCombineSend(**ctx, expert_y, recv_tokens, record_rows, record_weights,
                                    home_offsets, sent.data());
      e.failure()) {
    return e;
  }
  return RunCombineRecv(**ctx, send_tokens, send_index, num_tokens, out);
}

}  // namespace
}  // namespace jem

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchSendCpu, jem::DispatchSendImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::AnyBuffer>()       // x [T, H]
                                  .Arg<jem::F32Buffer>()       // x_scale [T, S]
                                  .Arg<jem::I32Buffer>()       // topk_ids [T, k]
                                  .Arg<jem::F32Buffer>()       // topk_weights [T, k]
                                  .Arg<jem::I32Buffer>()       // num_tokens []
                                  .Ret<jem::I32Buffer>()       // send_tokens [R]
                                  .Ret<jem::I32Buffer>());     // send_index [T, k]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchRecvCpu, jem::DispatchRecvImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::I32Buffer>()       // send_tokens [R]
                                  .Ret<jem::AnyBuffer>()       // expert_x [M, H]
                                  .Ret<jem::F32Buffer>()       // expert_x_scale [M, S]
                                  .Ret<jem::I32Buffer>()       // expert_counts [L]
                                  .Ret<jem::I32Buffer>()       // group_sizes [L]
                                  .Ret<jem::I32Buffer>()       // recv_tokens [R]
                                  .Ret<jem::I32Buffer>()       // record_rows [N, k]
                                  .Ret<jem::F32Buffer>()       // record_weights [N, k]
                                  .Ret<jem::I32Buffer>());     // home_offsets [R]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemDispatchCpu, jem::DispatchImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::AnyBuffer>()       // x [T, H]
                                  .Arg<jem::F32Buffer>()       // x_scale [T, S]
                                  .Arg<jem::I32Buffer>()       // topk_ids [T, k]
                                  .Arg<jem::F32Buffer>()       // topk_weights [T, k]
                                  .Arg<jem::I32Buffer>()       // num_tokens []
                                  .Ret<jem::I32Buffer>()       // send_tokens [R]
                                  .Ret<jem::I32Buffer>()       // send_index [T, k]
                                  .Ret<jem::AnyBuffer>()       // expert_x [M, H]
                                  .Ret<jem::F32Buffer>()       // expert_x_scale [M, S]
                                  .Ret<jem::I32Buffer>()       // expert_counts [L]
                                  .Ret<jem::I32Buffer>()       // group_sizes [L]
                                  .Ret<jem::I32Buffer>()       // recv_tokens [R]
                                  .Ret<jem::I32Buffer>()       // record_rows [N, k]
                                  .Ret<jem::F32Buffer>()       // record_weights [N, k]
                                  .Ret<jem::I32Buffer>());     // home_offsets [R]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineSendCpu, jem::CombineSendImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::AnyBuffer>()       // expert_y [M, H]
                                  .Arg<jem::I32Buffer>()       // recv_tokens [R]
                                  .Arg<jem::I32Buffer>()       // record_rows [N, k]
                                  .Arg<jem::F32Buffer>()       // record_weights [N, k]
                                  .Arg<jem::I32Buffer>()       // home_offsets [R]
                                  .Ret<jem::I32Buffer>());     // sent [R]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineRecvCpu, jem::CombineRecvImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::I32Buffer>()       // sent [R]
                                  .Arg<jem::I32Buffer>()       // send_tokens [R]
                                  .Arg<jem::I32Buffer>()       // send_index [T, k]
                                  .Arg<jem::I32Buffer>()       // num_tokens []
                                  .Ret<jem::AnyBuffer>());     // out [T, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JemCombineCpu, jem::CombineImpl,
                              jem::ffi::Ffi::Bind()
                                  .Attr<int64_t>("context")    // all-to-all context id
                                  .Arg<jem::AnyBuffer>()       // expert_y [M, H]
                                  .Arg<jem::I32Buffer>()       // recv_tokens [R]
                                  .Arg<jem::I32Buffer>()       // record_rows [N, k]
                                  .Arg<jem::F32Buffer>()       // record_weights [N, k]
                                  .Arg<jem::I32Buffer>()       // home_offsets [R]
                                  .Arg<jem::I32Buffer>()       // send_tokens [R]
                                  .Arg<jem::I32Buffer>()       // send_index [T, k]
                                  .Arg<jem::I32Buffer>()       // num_tokens []
                                  .Ret<jem::AnyBuffer>());     // out [T, H]
