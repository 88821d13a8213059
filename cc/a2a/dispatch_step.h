// One dispatch step on the host, in two halves. The send half packs and posts what can go
// before any peer's counts are known; the recv half finishes the exchange and lays the
// received tokens out per local expert. See dispatch_step.cc for the protocol in order.
#pragma once

#include <cstdint>

#include "cc/a2a/all_to_all_context.h"
#include "cc/kernels/host_kernels.h"

namespace jem {

// send_tokens [R] and send_index [T, k]: the home side of the handle (cc/ffi/README.md).
void DispatchSend(AllToAllContext& ctx, const DispatchInput& input, int32_t* send_tokens,
                  int32_t* send_index);

// `send_tokens` is what DispatchSend returned (checked against the pending step).
// home_offsets [R]: where this rank's partials go in each home rank's combine_recv.
void DispatchRecv(AllToAllContext& ctx, const int32_t* send_tokens, const ExpertLayout& out,
                  int32_t* home_offsets);

}  // namespace jem
