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
#include "cc/ffi/operands.h"

namespace jem {
namespace {

std::shared_ptr<AllToAllContext> Find(int64_t context) {
  std::shared_ptr<AllToAllContext> ctx = FindContext(context);
  if (!ctx) {
    throw ContextNotFound("no all-to-all context with id " + std::to_string(context) +
                          " in this process: the AllToAll was closed, or was created in "
                          "another process.");
  }
  return ctx;
}

// --- the groups as the host steps take them ---

DispatchInput Input(const operands::DispatchInputs& in) {
  return {in.x, in.x_scale, in.topk_ids, in.topk_weights, *in.num_tokens};
}

ExpertLayout Expert(const operands::RecvResults& recv, const operands::ExpertHandle& handle) {
  return {recv.expert_x,      recv.expert_x_scale, recv.expert_counts, recv.group_sizes,
          handle.recv_tokens, handle.record_rows,  handle.record_weights};
}

ExpertHandle Expert(const operands::ExpertHandle& in) {
  return {in.recv_tokens, in.record_rows, in.record_weights, in.home_offsets};
}

HomeHandle Home(const operands::HomeHandle& in) {
  return {in.send_tokens, in.send_index, *in.num_tokens};
}

// --- the targets, on checked buffers ---

void Run(target::DispatchSend, AllToAllContext& ctx, const operands::DispatchInputs& in,
         const operands::SendHandle& send) {
  DispatchSend(ctx, Input(in), send.send_tokens, send.send_index);
}

void Run(target::DispatchRecv, AllToAllContext& ctx, const operands::SendTokens& send_tokens,
         const operands::RecvResults& recv, const operands::ExpertHandle& handle) {
  DispatchRecv(ctx, send_tokens.p, Expert(recv, handle), handle.home_offsets);
}

void Run(target::Dispatch, AllToAllContext& ctx, const operands::DispatchInputs& in,
         const operands::SendHandle& send, const operands::RecvResults& recv,
         const operands::ExpertHandle& handle) {
  DispatchSend(ctx, Input(in), send.send_tokens, send.send_index);
  DispatchRecv(ctx, send.send_tokens, Expert(recv, handle), handle.home_offsets);
}

void Run(target::CombineSend, AllToAllContext& ctx, const operands::ExpertY& expert_y,
         const operands::ExpertHandle& handle, const operands::Sent& sent) {
  CombineSend(ctx, expert_y.p, Expert(handle), sent.p);
}

void Run(target::CombineRecv, AllToAllContext& ctx, const operands::Sent&,
         const operands::HomeHandle& home, const operands::Out& out) {
  CombineRecv(ctx, Home(home), out.p);
}

// The sent counts only order the two halves; here they run back to back.
void Run(target::Combine, AllToAllContext& ctx, const operands::ExpertY& expert_y,
         const operands::ExpertHandle& handle, const operands::HomeHandle& home,
         const operands::Out& out) {
  CombineSend(ctx, expert_y.p, Expert(handle), /*sent=*/nullptr);
  CombineRecv(ctx, Home(home), out.p);
}

template <typename Target>
ffi::Error CpuHandler(int64_t context, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return RunTarget<Target>([context] { return Find(context); }, args, rets,
                           [](AllToAllContext& ctx, const auto&... groups) {
                             Run(Target{}, ctx, groups...);
                           });
}

// Every target binds the same: the context id, then its buffers, which CpuHandler reads.
inline auto CpuBinding() {
  return ffi::Ffi::Bind().Attr<int64_t>("context").RemainingArgs().RemainingRets();
}

}  // namespace
}  // namespace jem

#define JEM_DEFINE_CPU_HANDLER(Name, python_name) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Jem##Name##Cpu, jem::CpuHandler<jem::target::Name>, \
                                jem::CpuBinding());
JEM_FFI_TARGETS(JEM_DEFINE_CPU_HANDLER)
#undef JEM_DEFINE_CPU_HANDLER
