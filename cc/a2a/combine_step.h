// One combine step on the host, in two halves: the expert side reduces its outputs into one
// weighted partial per received token and sends them home; the home rank sums them.
// See combine_step.cc for the protocol in order.
#pragma once

#include <cstdint>

#include "cc/a2a/all_to_all_context.h"

namespace jem {

// The expert side of a dispatch handle (cc/ffi/README.md).
struct ExpertHandle {
  const int32_t* recv_tokens = nullptr;     // [R]
  const int32_t* record_rows = nullptr;     // [N, k]
  const float* record_weights = nullptr;    // [N, k]
  const int32_t* home_offsets = nullptr;    // [R]
};

// The home side of a dispatch handle.
struct HomeHandle {
  const int32_t* send_tokens = nullptr;     // [R]
  const int32_t* send_index = nullptr;      // [T, k]
  int32_t num_tokens = 0;
};

// expert_y [M, H] in the combine dtype; sent [R]: partial rows sent to each home rank, or null
// (the fused combine has no such result).
void CombineSend(AllToAllContext& ctx, const void* expert_y, const ExpertHandle& handle,
                 int32_t* sent);

// out [T, H] in the combine dtype.
void CombineRecv(AllToAllContext& ctx, const HomeHandle& handle, void* out);

}  // namespace jem
