// The dispatch protocol, top to bottom.
//
// send half:  wait credits of the previous step -> count -> pack -> route row to every peer ->
//             first records of each chunk to that peer's private slot -> own chunk locally
// recv half:  wait every peer's route row -> full count matrix -> capacity verdict ->
//             overflow records at cumulative offsets -> wait the data writes -> unpack ->
//             credit to every peer
#include "cc/a2a/dispatch_step.h"

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cc/base/plan.h"

namespace jem {
namespace {

// Copies records [begin, end) of this rank's own chunk to where a peer would have written
// them in this rank's receive buffers. `overflow_start` matters only for records past the
// private slot, and is known only once every route row has arrived.
void CopyOwnRecords(AllToAllContext& ctx, int64_t begin, int64_t end, int64_t overflow_start) {
  const Layout& l = ctx.layout();
  const int me = ctx.rank();
  const int64_t chunk = ctx.route().send_offset(me, me);
  uint8_t* arena = ctx.arena();
  for (int64_t j = begin; j < end; ++j) {
    std::memcpy(arena + l.recv_record_offset(me, j, overflow_start),
                arena + l.dispatch_send_record_offset(chunk + j), l.record_bytes());
  }
}

// One scatter of this step's writes of `kind`: write(d) -> {src, dst, bytes} or nothing, for
// every peer d.
template <typename Write>
void ScatterToPeers(AllToAllContext& ctx, ImmKind kind, uint32_t seq, Write&& write) {
  std::vector<WriteSpec> writes;
  for (int d = 0; d < ctx.layout().num_ranks; ++d) {
    if (d == ctx.rank()) continue;
    if (const std::optional<WriteSpec> w = write(d)) {
      writes.push_back(*w);
      writes.back().peer = ctx.PeerIndex(d);
    }
  }
  if (!writes.empty()) ctx.Scatter(writes, kind, seq);
}

// Posts this rank's route row to the same place in every peer's route table.
void PostRouteRow(AllToAllContext& ctx, uint32_t seq) {
  const Layout& l = ctx.layout();
  const uint64_t offset = l.route_row_offset(ctx.rank());
  ScatterToPeers(ctx, ImmKind::kRoute, seq, [&](int) {
    return std::optional<WriteSpec>({0, offset, offset, uint64_t(l.route_row_ints()) * 4});
  });
}

// The first min(n, P) records of each chunk go to this rank's private slot on the peer; a
// peer that gets nothing still gets a zero-length write, so receivers count one per peer.
void PostPrivateWrites(AllToAllContext& ctx, uint32_t seq) {
  const Layout& l = ctx.layout();
  const RouteTable route = ctx.route();
  const int me = ctx.rank();
  ScatterToPeers(ctx, ImmKind::kDispatchData, seq, [&](int d) {
    return std::optional<WriteSpec>(
        {0, uint64_t(l.dispatch_send_record_offset(route.send_offset(me, d))),
         uint64_t(l.private_record_offset(me, 0)),
         uint64_t(route.private_count(me, d) * l.record_bytes())});
  });
}

// The rest of each chunk goes to the peer's overflow region, after the overflow of every
// lower-ranked sender.
void PostOverflowWrites(AllToAllContext& ctx, uint32_t seq) {
  const Layout& l = ctx.layout();
  const RouteTable route = ctx.route();
  const int me = ctx.rank();
  ScatterToPeers(ctx, ImmKind::kDispatchData, seq, [&](int d) -> std::optional<WriteSpec> {
    if (route.overflow_count(me, d) == 0) return std::nullopt;
    const int64_t first = route.send_offset(me, d) + l.private_records();
    return WriteSpec{0, uint64_t(l.dispatch_send_record_offset(first)),
                     uint64_t(l.overflow_record_offset(route.overflow_start(me, d))),
                     uint64_t(route.overflow_count(me, d) * l.record_bytes())};
  });
}

// Ranks whose route row has not arrived (still carrying the receiver's mark), as "1, 3".
std::string AwaitedRouteRanks(AllToAllContext& ctx) {
  std::string ranks;
  for (int s = 0; s < ctx.layout().num_ranks; ++s) {
    if (s != ctx.rank() && ctx.route_row(s)[0] == kRouteAwaited) {
      ranks += (ranks.empty() ? "" : ", ") + std::to_string(s);
    }
  }
  return ranks;
}

}  // namespace

void DispatchSend(AllToAllContext& ctx, const DispatchInput& input, int32_t* send_tokens,
                  int32_t* send_index) {
  RunHalf(ctx, ctx.dispatch, Half::kSend, [&](uint32_t seq) {
    const Layout& l = ctx.layout();
    const int me = ctx.rank();

    // Peers must have finished reading what this rank wrote them in the previous step.
    if (ctx.dispatch.steps > 0) {
      ctx.WaitArrivals(ImmKind::kDispatchCredit, seq - 1, l.num_ranks - 1,
                       "every rank to finish reading the previous dispatch step");
    }
    ctx.WaitAllSent();

    int32_t* route_row = ctx.route_row(me);
    const std::string problem = CheckDispatchInput(l, input);
    if (!problem.empty()) {
      // Tell the peers at once, so that they fail now instead of at their deadline.
      std::memset(route_row, 0, l.route_row_ints() * 4);
      route_row[0] = kRouteFailed;
      if (l.num_ranks > 1) PostRouteRow(ctx, seq);
      throw InputError(problem);
    }

    CountAndPackHost(l, input, route_row,
                     ctx.arena() + l.dispatch_send_offset(), send_tokens, send_index);
    if (l.num_ranks > 1) {
      PostRouteRow(ctx, seq);
      PostPrivateWrites(ctx, seq);
    }
    CopyOwnRecords(ctx, 0, ctx.route().private_count(me, me), 0);
  });
}

void DispatchRecv(AllToAllContext& ctx, const int32_t* send_tokens, const ExpertLayout& out,
                  int32_t* home_offsets) {
  RunHalf(ctx, ctx.dispatch, Half::kRecv, [&](uint32_t seq) {
    const Layout& l = ctx.layout();
    const int me = ctx.rank();
    const int R = l.num_ranks;
    const RouteTable route = ctx.route();
    for (int d = 0; d < R; ++d) {
      if (send_tokens[d] != route.tokens(me, d)) {
        throw InputError("send_tokens is not the one the latest dispatch_send returned.");
      }
    }

    // Every peer's route row: the full count matrix.
    try {
      ctx.WaitArrivals(ImmKind::kRoute, seq, R - 1, "the route counts of every rank");
    } catch (const TimeoutError& e) {
      throw TimeoutError("no route counts from rank(s) " + AwaitedRouteRanks(ctx) + ": " +
                         e.what());
    }
    for (int s = 0; s < R; ++s) {
      if (route.sender_failed(s)) {
        throw InputError("rank " + std::to_string(s) +
                         " rejected its dispatch input (its own error says why).");
      }
    }

    // Every rank evaluates the same matrix, so all of them stop here together, before any
    // overflow write.
    const int64_t overfull = route.first_overfull_rank();
    if (overfull >= 0) {
      throw InputError(
          "the routing needs " + std::to_string(route.recv_rows(overfull)) +
          " rows of expert_x on rank " + std::to_string(overfull) + " (" +
          std::to_string(route.recv_records(overfull)) + " tokens, each local expert's rows "
          "rounded up to expert_alignment = " + std::to_string(l.expert_alignment) +
          "), more than max_recv_tokens = " + std::to_string(l.max_recv_tokens) +
          "; create the AllToAll with a larger max_recv_tokens (the default always fits).");
    }

    if (R > 1) PostOverflowWrites(ctx, seq);
    CopyOwnRecords(ctx, route.private_count(me, me), route.tokens(me, me),
                   route.overflow_start(me, me));
    ctx.WaitArrivals(ImmKind::kDispatchData, seq,
                     static_cast<uint32_t>(route.expected_dispatch_writes(me)),
                     "the dispatched tokens of every rank");

    const std::string problem = UnpackHost(l, ctx.arena(), me, out);
    if (!problem.empty()) throw Error(problem);
    for (int s = 0; s < R; ++s) home_offsets[s] = static_cast<int32_t>(route.send_offset(s, me));

    // Done reading: mark the rows awaited again and let every sender reuse this rank's buffers.
    for (int s = 0; s < R; ++s) {
      if (s != me) ctx.route_row(s)[0] = kRouteAwaited;
    }
    if (R > 1) ctx.Barrier(ImmKind::kDispatchCredit, seq);
  });
}

}  // namespace jem
