// The combine protocol, top to bottom.
//
// send half:  wait credits of the previous step -> weighted partial per received record
//             (float32 accumulation) -> one write per home rank (zero-length if nothing) and
//             a local copy for this rank's own tokens
// recv half:  wait one write from every peer -> final float32 sum per token -> credit to every
//             peer
#include "cc/a2a/combine_step.h"

#include <cstring>
#include <string>
#include <vector>

#include "cc/kernels/host_kernels.h"

namespace jem {
namespace {

// The handle must be one that dispatch produced with this layout: its counts decide where
// partials are written, so they are bounded before any write.
void CheckExpertHandle(const Layout& l, const ExpertHandle& h) {
  int64_t records = 0;
  for (int s = 0; s < l.num_ranks; ++s) {
    if (h.recv_tokens[s] < 0 || h.recv_tokens[s] > l.max_tokens || h.home_offsets[s] < 0 ||
        int64_t(h.home_offsets[s]) + h.recv_tokens[s] > l.send_capacity()) {
      throw InputError("the handle's recv_tokens / home_offsets are not from a dispatch of this "
                       "AllToAll; pass the handle that dispatch returned, unchanged.");
    }
    records += h.recv_tokens[s];
  }
  if (records > l.max_recv_records()) {
    throw InputError("the handle's recv_tokens add up to more records than this AllToAll can "
                     "receive; pass the handle that dispatch returned, unchanged.");
  }
}

}  // namespace

void CombineSend(AllToAllContext& ctx, const void* expert_y, const ExpertHandle& handle,
                 int32_t* sent) {
  RunHalf(ctx, ctx.combine, Half::kSend, [&](uint32_t seq) {
    const Layout& l = ctx.layout();
    const int R = l.num_ranks;
    CheckExpertHandle(l, handle);

    // Home ranks must have finished summing what this rank sent them in the previous step.
    if (ctx.combine.steps > 0) {
      ctx.WaitArrivals(ImmKind::kCombineCredit, seq - 1, R - 1,
                       "every rank to finish reading the previous combine step");
    }
    ctx.WaitAllSent();

    int64_t num_records = 0;
    for (int s = 0; s < R; ++s) num_records += handle.recv_tokens[s];
    uint8_t* arena = ctx.arena();
    const std::string problem =
        CombineReduceHost(l, expert_y, num_records, handle.record_rows, handle.record_weights,
                          arena + l.combine_send_offset());
    if (!problem.empty()) throw InputError(problem);

    // Partials of home rank s are records [base_s, base_s + n_s), in s's record order: they
    // land where s keeps its chunk for this rank.
    std::vector<WriteSpec> writes;
    for (int s = 0, base = 0; s < R; base += handle.recv_tokens[s], ++s) {
      const uint64_t src = l.combine_send_row_offset(base);
      const uint64_t dst = l.combine_recv_row_offset(handle.home_offsets[s]);
      const uint64_t length = uint64_t(handle.recv_tokens[s]) * l.combine_row_bytes();
      if (sent != nullptr) sent[s] = handle.recv_tokens[s];
      if (s == ctx.rank()) {
        std::memmove(arena + dst, arena + src, length);
      } else {
        writes.push_back({ctx.PeerIndex(s), src, dst, length});
      }
    }
    if (!writes.empty()) ctx.Scatter(writes, ImmKind::kCombineData, seq);
  });
}

void CombineRecv(AllToAllContext& ctx, const HomeHandle& handle, void* out) {
  RunHalf(ctx, ctx.combine, Half::kRecv, [&](uint32_t seq) {
    const Layout& l = ctx.layout();
    const int R = l.num_ranks;
    if (handle.num_tokens < 0 || handle.num_tokens > l.max_tokens) {
      throw InputError("the handle's num_tokens = " + std::to_string(handle.num_tokens) +
                       " is outside [0, max_tokens_per_rank = " + std::to_string(l.max_tokens) +
                       "].");
    }
    ctx.WaitArrivals(ImmKind::kCombineData, seq, R - 1, "the combine partials of every rank");

    int64_t num_partials = 0;
    for (int d = 0; d < R; ++d) num_partials += handle.send_tokens[d];
    if (num_partials < 0 || num_partials > l.send_capacity()) {
      throw InputError("the handle's send_tokens are not from a dispatch of this AllToAll.");
    }
    const std::string problem =
        CombineSumHost(l, ctx.arena() + l.combine_recv_offset(), num_partials,
                       handle.send_index, handle.num_tokens, out);
    if (!problem.empty()) throw InputError(problem);

    if (R > 1) ctx.Barrier(ImmKind::kCombineCredit, seq);
  });
}

}  // namespace jem
