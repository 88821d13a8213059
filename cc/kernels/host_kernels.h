// Host (CPU) twins of the dispatch and combine kernels: count, pack, unpack into the
// per-expert layout, weighted partial reduce, final sum. The CUDA kernels (*.cu) have the same
// semantics; both follow cc/base/layout.h and cc/a2a/plan.h.
//
// Functions that can meet bad input return an error sentence, empty on success; they never
// write out of bounds of the buffers the layout describes.
#pragma once

#include <cstdint>
#include <string>

#include "cc/base/layout.h"

namespace jem {

// One rank's dispatch input, per-rank shapes (T = max_tokens, k = experts_per_token).
struct DispatchInput {
  const void* x = nullptr;               // [T, H] in the dispatch dtype
  const float* x_scale = nullptr;        // [T, H / 128], fp8 only
  const int32_t* topk_ids = nullptr;     // [T, k], -1 = unused slot
  const float* topk_weights = nullptr;   // [T, k]
  int32_t num_tokens = 0;                // rows at and past it are ignored
};

// The per-expert layout that dispatch_recv produces, and the expert side of the handle.
struct ExpertLayout {
  void* expert_x = nullptr;              // [M, H] in the dispatch dtype
  float* expert_x_scale = nullptr;       // [M, H / 128], fp8 only
  int32_t* expert_counts = nullptr;      // [L]
  int32_t* group_sizes = nullptr;        // [L]
  int32_t* recv_tokens = nullptr;        // [R]
  int32_t* record_rows = nullptr;        // [N, k]
  float* record_weights = nullptr;       // [N, k]
};

// num_tokens in [0, T] and every used expert id in [-1, E).
std::string CheckDispatchInput(const Layout& layout, const DispatchInput& input);

// Counts and packs one rank's tokens: `route_row` (R entries of [tokens, per local expert],
// see layout.h) and `send_tokens` [R] get the counts, `send_records` (the dispatch_send region)
// one contiguous chunk of records per destination rank, `send_index` [T, k] where each token's
// record went. The input must have passed CheckDispatchInput.
void CountAndPackHost(const Layout& layout, const DispatchInput& input, int32_t* route_row,
                      uint8_t* send_records, int32_t* send_tokens, int32_t* send_index);

// Expands the records received by `rank` (in its arena's private slots and overflow region,
// placed by the full route table at the arena's start) into the per-expert layout. Rows of an
// expert are ordered by (sender, record, slot); padding rows and rows past the last group are
// zero. Fails if the records disagree with the route counts.
std::string UnpackHost(const Layout& layout, const uint8_t* arena, int rank,
                       const ExpertLayout& out);

// Expert side of combine: for each of `num_records` received records g, the partial
// sum_i record_weights[g, i] * expert_y[record_rows[g, i]] accumulated in float32 and stored in
// the combine dtype at `partials` + g * combine_row_bytes.
std::string CombineReduceHost(const Layout& layout, const void* expert_y, int64_t num_records,
                              const int32_t* record_rows, const float* record_weights,
                              uint8_t* partials);

// Home side of combine: out[t] = sum of the partials at send_index[t, i] >= 0 (float32
// accumulation), zero for t >= num_tokens. `num_partials` bounds the valid indices.
std::string CombineSumHost(const Layout& layout, const uint8_t* partials, int64_t num_partials,
                           const int32_t* send_index, int32_t num_tokens, void* out);

}  // namespace jem
