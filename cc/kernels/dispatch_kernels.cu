// The dispatch kernels: the send half, the recv half, and the whole op as one kernel of both,
// which saves a launch and the recv half's start-up (at small T, most of what a step costs).
// The whole op's blocks wait for their own rank's ready flag, so its grid must fit on the GPU
// at once; where it does not, the whole op runs as the two halves.
//
// Send half: count, pack and store each token once into every destination rank's
// receive slot (over NVLink for peers), with the route row and the slot ranks the receiver
// needs, then raise this rank's ready flag at every destination.
//
// Staged (the dispatch_send half): what goes to a peer is packed into this rank's outbox for
// that peer instead, and the copy engine moves it (NvlinkContext), so the SMs are free for
// other work while the bytes cross NVLink; then it copies staged_ready into the peers' ready
// flags. (A signalling kernel could wait for an SM behind a spinning recv kernel.)
//
// Fabric peers (other nodes) always get outboxes, in the fabric buffer: the last block
// publishes the step and the per-peer counts to the proxy, which posts the RDMA writes.
//
// Blocks own contiguous token ranges. Each block counts every token (per destination rank,
// and per expert for tokens before its range), so it knows the record index of each of its
// tokens and the chunk offsets of send_index without waiting for any other block. A block
// packs its range in pieces of the full grid's share (one piece unless an SM budget shrank the
// grid), carrying its running counts from piece to piece. At small T
// the kernel is bound by latency, not bytes: every phase is one parallel pass over coalesced
// loads, int32 index math, and the credit wait overlaps the counting.
//
// Recv half: wait for every sender's route row (NVLink senders raise its flag before they pack,
// so that this overlaps their packing and the send half's ticket), check the routing against
// the buffers (every rank checks every rank, from the same route table, so all agree) and
// place the experts' rows; then wait for every sender's ready flag, and expand
// each received record into the rows of its local experts: expert_x is grouped by local
// expert, rows within an expert ordered by (sender, record, slot), padding rows zero. Every
// sender gets the credit to reuse its slot here from the recv kernel's last block, or, after a
// whole op's kernel, from the next kernel's start (EndRecv, GiveCredits).
//
// Every block derives the expert offsets from the route table itself (one parallel pass of
// loads into shared memory); the row of each slot is expert start + the rows of earlier
// senders + the slot rank the sender computed, so blocks own contiguous record ranges (the
// last block the first range) and never wait for each other. A block expands its range in
// pieces of at most the full grid's share (one piece unless an SM budget shrank the grid).
//
// Loops outside the copies carry `#pragma unroll 1`: at decode sizes each runs once or a few
// times per thread, and unrolled copies of them only grow the code that every launch fetches
// again (stalls on instruction fetch were a quarter of the fused dispatch's time at T=1).
#include <algorithm>

#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// A piece is the tokens a block packs at a time.
__host__ __device__ inline Plan PlanSend(const Layout& lay, int full_grid) {
  Plan p;
  p.piece = CeilDiv32(lay.max_tokens, full_grid);
  const int64_t R = lay.num_ranks, E = lay.num_experts, k = lay.experts_per_token;
  const int64_t piece = p.piece;
  p.shared_bytes = (piece + 1) * R * 16 +            // record and slot-rank pointers
                   lay.max_tokens * 8 +              // dest masks of every token
                   4 * (8 + 3 * R + 2 * E +          // verdicts, counts
                        piece * (2 * R + 3 * k));    // record index, first slot, slot rank,
                                                     // the first piece's ids and weights
  return p;
}

// Where this rank's route row, slot ranks and records for destination d go.
struct Destination {
  Arena me, dest;  // `me` holds the outbox: this rank's arena, or its fabric buffer
  int rank, d;
  bool outbox, fabric;

  // The route row goes straight to NVLink peers, staged or not: they fold it while the
  // records are on their way.
  __device__ __forceinline__ int32_t* route() const {
    return fabric ? me.outbox_route(d) : dest.route_row(rank);
  }
  __device__ __forceinline__ int32_t* slot_rank(int64_t j) const {
    return outbox ? me.outbox_slot_rank(d, j) : dest.slot_rank(rank, j);
  }
  __device__ __forceinline__ uint8_t* record(int64_t j) const {
    return outbox ? me.outbox_record(d, j) : dest.record(rank, j);
  }
};

__device__ __forceinline__ Destination DestinationOf(const NvlinkArgs& a, bool staged, int d) {
  const bool fabric = IsFabric(a, d);
  return Destination{fabric ? FabricArena(a) : ArenaOf(a, a.rank), ArenaOf(a, d), a.rank, d,
                     fabric || (staged && d != a.rank && !((a.same_gpu_mask >> d) & 1)),
                     fabric};
}

// The send half of `step` (in_turn: the halves' order allows it), by every block of the grid;
// returns (to every thread) whether this block was the last past the ticket. whole: the whole
// op's kernel, whose blocks are all resident, and whose recv half reads this rank's own tokens
// from x itself, so that records to this rank carry no x or scales.
__device__ __forceinline__ bool SendBlocks(const NvlinkArgs& a, const DispatchSendIo& io,
                                           bool staged, bool in_turn, uint64_t step, bool whole) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token, E = lay.num_experts;
  const int T = lay.max_tokens;
  const int L = a.div.local_experts.d;
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const Plan plan = PlanSend(lay, FullGrid(a));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  Stamp(a, kDispatchStart);

  extern __shared__ __align__(16) uint8_t smem[];
  const int piece = static_cast<int>(plan.piece);
  // Where each (token, destination) record and its slot ranks go, computed once: the offset
  // math stays out of the copy loops, which keeps them short (instruction fetch, not memory,
  // bounded this kernel at small T). Per destination, where its record 0 goes: a piece's
  // pointers are then one multiply each.
  auto** s_rec = reinterpret_cast<uint8_t**>(smem);           // [piece][R]
  auto** s_ranks = reinterpret_cast<int32_t**>(s_rec + piece * R);  // [piece][R]
  auto** s_rec0 = reinterpret_cast<uint8_t**>(s_ranks + piece * R);  // [R]
  auto** s_ranks0 = reinterpret_cast<int32_t**>(s_rec0 + R);          // [R]
  auto* s_mask = reinterpret_cast<uint64_t*>(s_ranks0 + R);  // [T] destinations per token
  int32_t* s_bad = reinterpret_cast<int32_t*>(s_mask + T);   // [8] first bad t*k+slot
  int32_t* s_tot = s_bad + 8;          // [R] tokens per destination
  int32_t* s_pre = s_tot + R;          // [R] tokens per destination before this block's range
  int32_t* s_base = s_pre + R;         // [R] chunk offset of each destination
  int32_t* s_epre = s_base + R;        // [E] slots per expert before this block's range
  int32_t* s_etot = s_epre + E;        // [E] slots per expert, all tokens (router)
  int32_t* s_index = s_etot + E;       // [piece][R] record index per destination, -1 = none
  int32_t* s_first = s_index + piece * R;  // [piece][R] first slot naming each destination
  int32_t* s_rank = s_first + piece * R;   // [piece][k] slot rank within its expert
  int32_t* s_ids = s_rank + piece * k;     // [piece][k] the first piece's expert ids
  float* s_wts = reinterpret_cast<float*>(s_ids + piece * k);  // [piece][k] and weights

  const int32_t raw_num_tokens = *io.num_tokens;
  const bool bad_num_tokens = raw_num_tokens < 0 || raw_num_tokens > T;
  const int nt = bad_num_tokens ? 0 : raw_num_tokens;
  const int per_block = CeilDiv32(T, gridDim.x);
  const int start = static_cast<int>(Min(T, blockIdx.x * per_block));
  const int end = static_cast<int>(Min(start + per_block, T));  // this block's rows
  const int own_end = Min(end, nt);  // tokens this block packs: [start, own_end)
  // The block that reports bad input and stores the route rows and their flag: the last, which
  // has no tokens at decode sizes, so that the flag's release delays no packing.
  const bool router = blockIdx.x == gridDim.x - 1;

#pragma unroll 1
  for (int i = tid; i < 8 + 3 * R + 2 * E; i += kThreads) s_bad[i] = i == 0 ? INT32_MAX : 0;
  __syncthreads();

  // The destinations may reuse what they received last step only once they said so: the
  // block's last threads wait for the credits while the others start counting.
  const int waiter = tid - (kThreads - R);
  bool credited = in_turn;
  if (in_turn && waiter >= 0) {
    credited = WaitFlag(a, FlagOf(a, DeviceWait::kDispatchCredit, waiter), step - 1,
                        DeviceWait::kDispatchCredit, waiter);
  }

  // Every token: its destinations, and its slots counted per expert (of the tokens before
  // this block's range; of all tokens in the router block). A thread takes whole tokens, so
  // that the masks need no atomics and nothing is divided by k; its slots' loads go out
  // together.
  // The ids and weights of the block's first piece stay in shared memory: the phases that
  // pack it then wait for no global load but x's.
  const FastDiv& rank_of = a.div.local_experts;
#pragma unroll 1
  for (int t = tid; t < T; t += kThreads) {
    uint64_t mask = 0;
    const bool keep = t >= start && t < start + piece;
    for (int i0 = 0; t < nt && i0 < k; i0 += 8) {
      int32_t ev[8];
      float wv[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        ev[u] = i0 + u < k ? io.topk_ids[t * k + i0 + u] : -1;
        wv[u] = keep && i0 + u < k ? io.topk_weights[t * k + i0 + u] : 0.0f;
      }
      if (keep) {
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (i0 + u < k) {
            s_ids[(t - start) * k + i0 + u] = ev[u];
            s_wts[(t - start) * k + i0 + u] = wv[u];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int32_t e = ev[u];
        if (e < -1 || e >= E) {
          atomicMin(s_bad, t * k + i0 + u);
        } else if (e >= 0) {
          mask |= uint64_t{1} << rank_of.Div(e);
          if (t < start) atomicAdd(&s_epre[e], 1);
          if (router) atomicAdd(&s_etot[e], 1);
        }
      }
    }
    s_mask[t] = mask;
  }
  const bool ok = __syncthreads_and(credited) != 0;
  Stamp(a, kDispatchCounted);
  const bool bad = bad_num_tokens || s_bad[0] != INT32_MAX;

  // Tokens per destination, warp by warp.
#pragma unroll 1
  for (int base = warp * 32; base < nt; base += kThreads) {
    const int t = base + lane;
    const uint64_t m = t < nt ? s_mask[t] : 0;
#pragma unroll 1
    for (int d = 0; d < R; ++d) {
      const unsigned all = __ballot_sync(kFullMask, (m >> d) & 1);
      const unsigned before = __ballot_sync(kFullMask, ((m >> d) & 1) && t < start);
      if (lane == 0 && all) atomicAdd(&s_tot[d], __popc(all));
      if (lane == 0 && before) atomicAdd(&s_pre[d], __popc(before));
    }
  }
  __syncthreads();
  if (tid == 0) {
    int32_t offset = 0;
#pragma unroll 1
    for (int d = 0; d < R; ++d) {
      s_base[d] = offset;
      offset += bad ? 0 : s_tot[d];
    }
  }
#pragma unroll 1
  for (int d = tid; d < R; d += kThreads) {
    const Destination dst = DestinationOf(a, staged, d);
    s_rec0[d] = dst.record(0);
    s_ranks0[d] = dst.slot_rank(0);
  }

  if (router) {
    if (tid == 0 && bad) {
      if (bad_num_tokens) {
        SetError(a, DeviceError::kBadNumTokens, raw_num_tokens, 0, 0);
      } else {
        const int32_t at = s_bad[0];
        SetError(a, DeviceError::kBadExpertId, at / k, at % k, io.topk_ids[at]);
      }
    }
#pragma unroll 1
    for (int d = tid; d < R; d += kThreads) io.send_tokens[d] = bad ? 0 : s_tot[d];
    // The route row to every rank (this one included), then its flag: receivers fold the
    // route table while this rank packs.
    if (ok) {
      const int entry = a.div.route_entry.d, row = a.div.route_row.d;
#pragma unroll 1
      for (int x = tid; x < R * row; x += kThreads) {
        const int p = a.div.route_row.Div(x), w = x - p * row;
        const int d = a.div.route_entry.Div(w), j = w - d * entry;
        int32_t v;
        if (bad) {
          v = w == 0 ? kRouteFailed : 0;
        } else {
          v = j == 0 ? s_tot[d] : s_etot[d * L + j - 1];
        }
        DestinationOf(a, staged, p).route()[w] = v;
      }
      __syncthreads();
      SignalPeers(a, DeviceWait::kDispatchRoute, step);
    }
  }

  // This block's rows, a piece at a time: rows [lo, hi), of which [lo, lo + ntok) are packed.
#pragma unroll 1
  for (int lo = start; lo < end; lo += piece) {
    const int hi = Min(lo + piece, end);
    const int ntok = Min(hi, own_end) > lo ? Min(hi, own_end) - lo : 0;
    // The piece's expert ids and weights, [ntok][k].
    const int32_t* ids = lo == start ? s_ids : io.topk_ids + lo * k;
    const float* wts = lo == start ? s_wts : io.topk_weights + lo * k;

    // Record index per destination, the first slot naming each destination, and slot ranks in
    // (token, slot) order: warp 0, in order, carrying s_pre and s_epre to the next piece.
    if (warp == 0 && !bad) {
#pragma unroll 1
      for (int i = lane; i < ntok * R; i += 32) s_first[i] = k;
      __syncwarp();
#pragma unroll 1
      for (int tile = lo; tile < lo + ntok; tile += 32) {
        const int t = tile + lane;
        const uint64_t mask = t < lo + ntok ? s_mask[t] : 0;
#pragma unroll 1
        for (int d = 0; d < R; ++d) {
          const unsigned votes = __ballot_sync(kFullMask, (mask >> d) & 1);
          if (t < lo + ntok) {
            s_index[(t - lo) * R + d] =
                (mask >> d) & 1 ? s_pre[d] + __popc(votes & LaneMaskLt()) : -1;
          }
          __syncwarp();
          if (lane == 0) s_pre[d] += __popc(votes);
          __syncwarp();
        }
      }
      const int per_pass = 32 / k;  // tokens per pass, one lane per (token, slot)
#pragma unroll 1
      for (int tile = lo; tile < lo + ntok; tile += per_pass) {
        const int t = tile + a.div.k.Div(lane);
        const int i = a.div.k.Mod(lane);
        const bool valid = lane < per_pass * k && t < lo + ntok;
        const int32_t e = valid ? ids[(t - lo) * k + i] : -1;
        const unsigned same = __match_any_sync(kFullMask, e);
        // Lanes run in slot order, so the lowest lane of a (token, destination) is its first.
        const int d = e >= 0 ? rank_of.Div(e) : -1;
        const unsigned same_dest = __match_any_sync(kFullMask, e >= 0 ? t * R + d : -1);
        if (valid) s_rank[(t - lo) * k + i] = e >= 0 ? s_epre[e] + __popc(same & LaneMaskLt()) : -1;
        if (e >= 0 && lane == __ffs(same_dest) - 1) s_first[(t - lo) * R + d] = i;
        __syncwarp();
        if (e >= 0 && lane == __ffs(same) - 1) s_epre[e] += __popc(same);
        __syncwarp();
      }
    }
    __syncthreads();

    // send_index for every row of this piece: the first slot naming a destination carries the
    // token's record index there.
#pragma unroll 1
    for (int x = tid; x < (hi - lo) * k; x += kThreads) {
      const int lt = a.div.k.Div(x), i = x - lt * k;
      int32_t index = -1;
      if (!bad && lt < ntok) {
        const int32_t e = ids[x];
        const int d = rank_of.Div(e);
        if (e >= 0 && s_first[lt * R + d] == i) index = s_base[d] + s_index[lt * R + d];
      }
      io.send_index[lo * k + x] = index;
    }
#pragma unroll 1
    for (int x = tid; !bad && x < ntok * R; x += kThreads) {
      const int32_t j = s_index[x];
      const int d = a.div.ranks.Mod(x);
      s_rec[x] = j >= 0 ? s_rec0[d] + j * lay.record_bytes() : nullptr;
      s_ranks[x] = j >= 0 ? s_ranks0[d] + j * k : nullptr;
    }
    __syncthreads();
    Stamp(a, kDispatchRanked);

    if (ok && !bad) {
      // One pass over the piece's x (16-byte vectors, each loaded once and stored to every
      // destination of its token), its scales, and its metadata and slot ranks (an item per
      // (token, destination, slot)), so that a thread waits for memory once per batch of
      // items, not once per kind.
      const int x_vecs = static_cast<int>(lay.x_bytes() / 16);
      const int S = static_cast<int>(lay.num_scales());
      // The destinations whose records carry x and scales; none with one rank in the whole op.
      const uint64_t copied = whole ? ~(uint64_t{1} << a.rank) : ~uint64_t{0};
      const int payload = whole && R == 1 ? 0 : ntok;
      const int n_x = payload * x_vecs, n_s = payload * S;
      const auto* x = static_cast<const uint8_t*>(io.x) + static_cast<int64_t>(lo) * lay.x_bytes();
      Batched<4>(
          tid, n_x + n_s + ntok * R * k,
          [&](int w) {
            if (w < n_x) return LoadInput16(x + static_cast<int64_t>(w) * 16);
            if (w < n_x + n_s) {
              return make_int4(__float_as_int(io.x_scale[static_cast<int64_t>(lo) * S + w - n_x]),
                               0, 0, 0);
            }
            const int m = w - n_x - n_s, t = lo + a.div.ranks_k.Div(m), i = a.div.k.Mod(m);
            return make_int4(ids[(t - lo) * k + i], __float_as_int(wts[(t - lo) * k + i]), 0, 0);
          },
          [&](int w, int4 v) {
            if (w < n_x) {
              const int lt = a.div.x_vecs.Div(w), c = w - lt * x_vecs;
              for (uint64_t m = s_mask[lo + lt] & copied; m; m &= m - 1) {
                Store16(s_rec[lt * R + __ffsll(m) - 1] + c * 16, v);
              }
              return;
            }
            if (w < n_x + n_s) {
              const int lt = a.div.scales.Div(w - n_x), c = w - n_x - lt * S;
              for (uint64_t m = s_mask[lo + lt] & copied; m; m &= m - 1) {
                reinterpret_cast<int32_t*>(s_rec[lt * R + __ffsll(m) - 1] + lay.scale_offset())[c] =
                    v.x;
              }
              return;
            }
            const int m = w - n_x - n_s;
            const int lt = a.div.ranks_k.Div(m), d = a.div.ranks.Mod(a.div.k.Div(m));
            const int i = a.div.k.Mod(m);
            uint8_t* rec = s_rec[lt * R + d];
            if (rec == nullptr) return;
            const int32_t e = v.x;
            const int e_rank = e >= 0 ? rank_of.Div(e) : -1;
            const bool here = e_rank == d;
            reinterpret_cast<int32_t*>(rec + lay.expert_offset())[i] = here ? e - d * L : -1;
            reinterpret_cast<int32_t*>(rec + lay.weight_offset())[i] = here ? v.y : 0;
            s_ranks[lt * R + d][i] = here ? s_rank[lt * k + i] : -1;
            if (i == 0) {
              *reinterpret_cast<int32_t*>(rec + lay.src_token_offset()) = lo + lt;
#pragma unroll 1
              for (int64_t b = lay.weight_offset() + 4 * k; b < lay.record_bytes(); b += 4) {
                *reinterpret_cast<int32_t*>(rec + b) = 0;
              }
            }
          });
    }
    if (lo + piece < end) __syncthreads();  // the next piece rewrites what the copies read
  }
  Stamp(a, kDispatchPacked);

  if (!in_turn) return false;
  // In the whole op the router raises the ready flags: it has no records to expand at decode,
  // whereas a block that raised them after its own ticket would fold the route table late and
  // hold back its share of the expansion.
  const bool last = whole ? ChosenLast(a, kTicketDispatchSend, router)
                          : LastBlock(a, kTicketDispatchSend);
  Stamp(a, kDispatchSent);
  if (last) {
    if (tid == 0) st->dispatch_step[1] = step;
    if (!staged) {
      SignalPeers(a, DeviceWait::kDispatchReady, step);
    } else {
      // The copy engine raises the flags of the peers it copies to; this kernel those it
      // stored to directly.
      if (tid < R && (tid == a.rank || ((a.same_gpu_mask >> tid) & 1))) {
        SignalPeer(a, DeviceWait::kDispatchReady, tid, step);
      }
      // A Silent rank leaves its peers' flags where they are.
      if (tid == 0 && !Silent(st)) st->staged_ready = step;
    }
#pragma unroll 1
    for (int d = tid; a.fabric_mask != 0 && d < R; d += kThreads) {
      a.mailbox->dispatch_counts[d] = IsFabric(a, d) && !bad ? s_tot[d] : 0;
    }
    Publish(a, &a.mailbox->dispatch_sent, step);
  }
  return last;
}


// A piece is the records a block expands at a time.
__host__ __device__ inline Plan PlanRecv(const Layout& lay, int full_grid) {
  Plan p;
  p.piece = CeilDiv32(static_cast<int32_t>(lay.max_recv_records()), full_grid);
  const int64_t R = lay.num_ranks, L = lay.local_experts(), k = lay.experts_per_token;
  p.shared_bytes = 16 * p.piece +                    // where records' x and scales are
                   4 * (8 +                          // verdicts
                        2 * R + (R + 1) +            // rows and records needed, record bases
                        R * R + 2 * R * L +          // the route table, folded
                        5 * (L + 1) +                // count, group, pad, expert and pad starts
                        R * L +                      // rows of earlier senders per expert
                        kScanScratch +               // the scans
                        p.piece * k);                // rows of this piece's slots
  return p;
}

// Index of the last i in [0, n) with starts[i] <= x (starts nondecreasing, starts[0] <= x).
__device__ __forceinline__ int64_t UpperIndex(const int32_t* starts, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The recv half of `step`, by every block of the grid; ends_step: it ends the step
// (EndRecv); own: the whole op's send half (null in the recv kernel): this rank's own records
// take x and scales from its tokens, and its last block (the router, which raised the ready
// flags and folds the route table last) expands nothing.
__device__ __forceinline__ void RecvBlocks(const NvlinkArgs& a, const DispatchRecvIo& io,
                                           bool in_turn, uint64_t step, bool ends_step,
                                           const DispatchSendIo* own) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int L = a.div.local_experts.d;
  const int64_t M = lay.max_recv_tokens, N = lay.max_recv_records();
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const Plan plan = PlanRecv(lay, FullGrid(a));
  const int tid = threadIdx.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const int64_t gthreads = static_cast<int64_t>(gridDim.x) * kThreads;

  extern __shared__ __align__(16) uint8_t smem[];
  // [piece] where the x and the scales of each record of this piece are: the offset math
  // stays out of the copy loops, which keeps them short.
  auto** s_recs = reinterpret_cast<const uint8_t**>(smem);
  auto** s_scales = reinterpret_cast<const float**>(s_recs + plan.piece);
  int32_t* s_verdict = reinterpret_cast<int32_t*>(s_scales + plan.piece);  // [8]
  int32_t* s_need_rows = s_verdict + 8;                    // [R]
  int32_t* s_need_recs = s_need_rows + R;                  // [R]
  int32_t* s_rbase = s_need_recs + R;                      // [R + 1] first record per sender
  int32_t* s_tok = s_rbase + R + 1;                        // [R][R] records sender -> dest
  int32_t* s_col = s_tok + R * R;                          // [R][L] slots per (dest, expert)
  int32_t* s_own = s_col + R * L;                          // [R][L] slots sender -> my experts
  int32_t* s_count = s_own + R * L;                        // [L] rows per local expert
  int32_t* s_group = s_count + L + 1;                      // [L] rows with padding
  int32_t* s_pad = s_group + L + 1;                        // [L] padding rows
  int32_t* s_estart = s_pad + L + 1;                       // [L + 1] first row per expert
  int32_t* s_pstart = s_estart + L + 1;                    // [L + 1] first padding row
  int32_t* s_sbase = s_pstart + L + 1;                     // [R][L] rows of earlier senders
  int32_t* s_scan = s_sbase + R * L;                       // [kScanScratch]
  int32_t* s_rows = s_scan + kScanScratch;                 // [piece][k]

  if (tid == 0) {
    s_verdict[0] = INT32_MAX;
    s_verdict[1] = INT32_MAX;
  }
#pragma unroll 1
  for (int i = tid; i < R * L; i += kThreads) s_col[i] = 0;
  // The route table first: NVLink senders raise its flag before they pack their records.
  const bool routed = in_turn && WaitPeers(a, DeviceWait::kDispatchRoute, step);

  // The route table route[R][R][1 + L] (layout.h) folded in one pass: records per (sender,
  // dest), slots per (dest, expert) over all senders, and this rank's column per sender.
  if (routed) {
    const int entry = a.div.route_entry.d, row = a.div.route_row.d;
#pragma unroll 1
    for (int x = tid; x < R * row; x += kThreads) {
      const int src = a.div.route_row.Div(x), w = x - src * row;
      const int d = a.div.route_entry.Div(w), j = w - d * entry;
      const int32_t v = InboxOf(a, src).route_row(src)[w];
      if (j == 0) {
        s_tok[src * R + d] = v;
        if (d == 0 && v == kRouteFailed) atomicMin(&s_verdict[0], src);
      } else {
        atomicAdd(&s_col[d * L + j - 1], v);
        if (d == a.rank) s_own[src * L + j - 1] = v;
      }
    }
    __syncthreads();
    // Rows and records every rank needs, a warp per rank; the first full rank is the verdict.
    const int lane = tid & 31;
#pragma unroll 1
    for (int d = tid >> 5; d < R; d += kThreads / 32) {
      int32_t rows = 0, recs = 0;
#pragma unroll 1
      for (int e = lane; e < L; e += 32) {
        rows += a.div.alignment.RoundUp(s_col[d * L + e]);
      }
#pragma unroll 1
      for (int src = lane; src < R; src += 32) recs += s_tok[src * R + d];
      rows = WarpSum(rows);
      recs = WarpSum(recs);
      if (lane == 0) {
        s_need_rows[d] = rows;
        s_need_recs[d] = recs;
        if (rows > M || recs > N) atomicMin(&s_verdict[1], d);
      }
    }
  }
  __syncthreads();
  const int failed_sender = s_verdict[0] == INT32_MAX ? -1 : s_verdict[0];
  const int full_rank = s_verdict[1] == INT32_MAX ? -1 : s_verdict[1];
  const bool planned = routed && failed_sender < 0 && full_rank < 0;
  if (blockIdx.x == 0 && tid == 0) {
    if (routed && failed_sender >= 0) {
      SetError(a, DeviceError::kPeerFailed, failed_sender, 0, 0);
    } else if (routed && full_rank >= 0) {
      SetError(a, DeviceError::kCapacity, full_rank, s_need_rows[full_rank],
               s_need_recs[full_rank]);
    }
  }
  if (planned) {
    // Expert starts and the rows of earlier senders, per local expert.
    if (tid == kThreads - 1) {
      int32_t n = 0;
#pragma unroll 1
      for (int src = 0; src < R; ++src) {
        s_rbase[src] = n;
        n += s_tok[src * R + a.rank];
      }
      s_rbase[R] = n;
    }
#pragma unroll 1
    for (int e = tid; e < L; e += kThreads) {
      int32_t n = 0;
#pragma unroll 1
      for (int src = 0; src < R; ++src) {
        s_sbase[src * L + e] = n;
        n += s_own[src * L + e];
      }
      s_count[e] = n;
      s_group[e] = a.div.alignment.RoundUp(n);
      s_pad[e] = s_group[e] - n;
    }
    __syncthreads();
    BlockExclusiveScan2(s_group, s_pad, s_estart, s_pstart, L, s_scan);
    __syncthreads();
  }
  Stamp(a, kDispatchRouted);

  // Even a failed step waits for its records: every sender raises its ready flag.
  const bool arrived = routed && WaitPeers(a, DeviceWait::kDispatchReady, step);
  Stamp(a, kDispatchArrived);
  const bool good = planned && arrived;

  if (!good) {
    // A failed step still leaves the small outputs defined.
#pragma unroll 1
    for (int64_t x = gtid; x < N * k; x += gthreads) {
      io.record_rows[x] = -1;
      io.record_weights[x] = 0.0f;
    }
    if (blockIdx.x == 0) {
#pragma unroll 1
      for (int e = tid; e < L; e += kThreads) io.expert_counts[e] = io.group_sizes[e] = 0;
#pragma unroll 1
      for (int s = tid; s < R; s += kThreads) io.recv_tokens[s] = io.home_offsets[s] = 0;
    }
  } else {
    const int64_t total = s_rbase[R];
    if (blockIdx.x == 0) {
#pragma unroll 1
      for (int e = tid; e < L; e += kThreads) {
        io.expert_counts[e] = s_count[e];
        io.group_sizes[e] = s_group[e];
      }
#pragma unroll 1
      for (int src = tid; src < R; src += kThreads) {
        io.recv_tokens[src] = s_rbase[src + 1] - s_rbase[src];
        int32_t offset = 0;
#pragma unroll 1
        for (int d = 0; d < a.rank; ++d) offset += s_tok[src * R + d];
        io.home_offsets[src] = offset;
      }
    }

    // This block's records [g0, g1), a piece at a time: the row of every slot, then the copies.
    // Ranges in reverse block order: in the whole op at decode the last blocks packed nothing
    // and have folded the route table by the time the records are in, while the first still
    // pack, pass the ticket and fold.
    const int workers = own != nullptr && gridDim.x > 1 ? gridDim.x - 1 : gridDim.x;
    const int worker = workers - 1 - static_cast<int>(blockIdx.x);  // < 0: the router
    const int per_block = CeilDiv32(static_cast<int32_t>(total), workers);
    const int g0 = static_cast<int>(worker < 0 ? total : Min(total, worker * per_block));
    const int g1 = static_cast<int>(Min(total, g0 + per_block));
    const int piece = static_cast<int>(plan.piece);
    const int x_vecs = static_cast<int>(lay.x_bytes() / 16);
    const int S = static_cast<int>(lay.num_scales());
    auto* expert_x = static_cast<uint8_t*>(io.expert_x);
#pragma unroll 1
    for (int p0 = g0; p0 < g1; p0 += piece) {
      const int nrec = Min(p0 + piece, g1) - p0;
#pragma unroll 1
      for (int x = tid; x < nrec * k; x += kThreads) {
        const int r = a.div.k.Div(x), g = p0 + r, i = x - r * k;
        const int s = static_cast<int>(UpperIndex(s_rbase, R, g));
        const int j = g - s_rbase[s];
        const uint8_t* rec = InboxOf(a, s).record(s, j);
        if (i == 0) {
          const uint8_t* from = rec;
          const float* scales = reinterpret_cast<const float*>(rec + lay.scale_offset());
          if (own != nullptr && s == a.rank) {
            int32_t t = *reinterpret_cast<const int32_t*>(rec + lay.src_token_offset());
            if (t < 0 || t >= lay.max_tokens) {
              SetError(a, DeviceError::kCorrupt, s, j, 0);
              t = 0;
            }
            from = static_cast<const uint8_t*>(own->x) + static_cast<int64_t>(t) * lay.x_bytes();
            scales = own->x_scale + static_cast<int64_t>(t) * S;
          }
          s_recs[r] = from;
          s_scales[r] = scales;
        }
        const int32_t e = reinterpret_cast<const int32_t*>(rec + lay.expert_offset())[i];
        const float w = reinterpret_cast<const float*>(rec + lay.weight_offset())[i];
        const int32_t rank = InboxOf(a, s).slot_rank(s, j)[i];
        int32_t row = -1;
        if (e != -1) {
          const bool sane = e >= 0 && e < L && rank >= 0 && rank < s_own[s * L + e];
          if (sane) {
            row = s_estart[e] + s_sbase[s * L + e] + rank;
          } else {
            SetError(a, DeviceError::kCorrupt, s, j, i);
          }
        }
        s_rows[x] = row;
        io.record_rows[static_cast<int64_t>(g) * k + i] = row;
        io.record_weights[static_cast<int64_t>(g) * k + i] = row >= 0 ? w : 0.0f;
      }
      __syncthreads();

      // Expand: each 16-byte vector of a record is loaded once and stored to each of its rows.
      Batched<4>(
          tid, nrec * x_vecs,
          [&](int w) {
            const int r = a.div.x_vecs.Div(w);
            return Load16(s_recs[r] + (w - r * x_vecs) * 16);
          },
          [&](int w, int4 v) {
            const int r = a.div.x_vecs.Div(w), c = w - r * x_vecs;
            for (int i = 0; i < k; ++i) {
              const int32_t row = s_rows[r * k + i];
              if (row >= 0) Store16(expert_x + row * lay.x_bytes() + c * 16, v);
            }
          });
#pragma unroll 1
      for (int w = tid; w < nrec * S; w += kThreads) {
        const int r = a.div.scales.Div(w), c = w - r * S;
        const float scale = s_scales[r][c];
        for (int i = 0; i < k; ++i) {
          const int32_t row = s_rows[r * k + i];
          if (row >= 0) io.expert_x_scale[static_cast<int64_t>(row) * S + c] = scale;
        }
      }
      if (p0 + piece < g1) __syncthreads();  // the next piece rewrites what the copies read
    }
    Stamp(a, kDispatchExpanded);

    // Handle entries past the last record.
#pragma unroll 1
    for (int64_t x = total * k + gtid; x < N * k; x += gthreads) {
      io.record_rows[x] = -1;
      io.record_weights[x] = 0.0f;
    }

    // Zero rows: padding of each group, then (optionally) everything past the last group.
    const int64_t pad_rows = s_pstart[L];
    const int64_t used_rows = s_estart[L];
    const int64_t zero_rows = pad_rows + (a.zero_unused_rows ? M - used_rows : 0);
    // A warp per row.
    const int4 zero = make_int4(0, 0, 0, 0);
    const int lane = tid & 31;
#pragma unroll 1
    for (int64_t z = gtid / 32; z < zero_rows; z += gthreads / 32) {
      int64_t row;
      if (z < pad_rows) {
        const int64_t e = UpperIndex(s_pstart, L, z);
        row = s_estart[e] + s_count[e] + (z - s_pstart[e]);
      } else {
        row = used_rows + (z - pad_rows);
      }
      for (int c = lane; c < x_vecs; c += 32) Store16(expert_x + row * lay.x_bytes() + c * 16, zero);
      for (int c = lane; c < S; c += 32) io.expert_x_scale[row * S + c] = 0.0f;
    }
    Stamp(a, kDispatchZeroed);
  }

  if (in_turn && ends_step) {
    EndRecv(a, kTicketDispatchRecv, st->dispatch_step, DeviceWait::kDispatchCredit,
            &a.mailbox->dispatch_read, step);
  }
  Stamp(a, kDispatchEnd);
}


__global__ void __launch_bounds__(kThreads, 2)
    DispatchSendKernel(const __grid_constant__ NvlinkArgs a, const DispatchSendIo io,
                       bool staged) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  const bool in_turn = InTurn(a, st->dispatch_step, /*send=*/true, StepPhase::kDispatch);
  SendBlocks(a, io, staged, in_turn, st->dispatch_step[0] + 1, /*whole=*/false);
}

__global__ void __launch_bounds__(kThreads, 2)
    DispatchRecvKernel(const __grid_constant__ NvlinkArgs a, const DispatchRecvIo io) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  const bool in_turn = InTurn(a, st->dispatch_step, /*send=*/false, StepPhase::kDispatch);
  RecvBlocks(a, io, in_turn, st->dispatch_step[1], /*ends_step=*/true, /*own=*/nullptr);
}

// The whole op: the recv half starts in the blocks that sent, without a second launch. Its
// blocks wait for this rank's own ready flag, raised by the send half's last block, so every
// block must be resident at once (LoadDispatch checks that the grid fits).
__global__ void __launch_bounds__(kThreads, 2)
    DispatchKernel(const __grid_constant__ NvlinkArgs a, const DispatchSendIo send,
                   const DispatchRecvIo recv) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  // Read once: the send half's last block advances the steps while others may not have begun.
  const bool in_turn = InTurn(a, st->dispatch_step, /*send=*/true, StepPhase::kDispatch);
  const uint64_t step = st->dispatch_step[0] + 1;
  const bool last = SendBlocks(a, send, /*staged=*/false, in_turn, step, /*whole=*/true);
  if (last && threadIdx.x == 0 && EndsAtSend(a)) st->dispatch_step[0] = step;
  __syncthreads();  // the recv half reuses the shared memory
  RecvBlocks(a, recv, in_turn, step, /*ends_step=*/!EndsAtSend(a), &send);
}

int64_t WholeSharedBytes(const NvlinkArgs& args) {
  return std::max(PlanSend(args.layout, FullGrid(args)).shared_bytes,
                  PlanRecv(args.layout, FullGrid(args)).shared_bytes);
}

}  // namespace

bool LoadDispatch(const NvlinkArgs& args) {
  LoadKernels("loading dispatch_send", PlanSend(args.layout, FullGrid(args)).shared_bytes,
              DispatchSendKernel);
  LoadKernels("loading dispatch_recv", PlanRecv(args.layout, FullGrid(args)).shared_bytes,
              DispatchRecvKernel);
  LoadKernels("loading dispatch", WholeSharedBytes(args), DispatchKernel);
  return CoResident("loading dispatch", DispatchKernel, WholeSharedBytes(args), args);
}

void LaunchDispatchSend(const NvlinkArgs& args, const DispatchSendIo& io, bool staged,
                        cudaStream_t stream) {
  // A block per token, and one more where the full grid has room: the router, which then
  // packs nothing.
  const int grid = GridOf(args, Min(args.layout.max_tokens + 1, FullGrid(args)));
  LaunchKernel("launching dispatch_send", DispatchSendKernel, grid,
               PlanSend(args.layout, FullGrid(args)).shared_bytes, stream, args, io, staged);
}

void LaunchDispatchRecv(const NvlinkArgs& args, const DispatchRecvIo& io, cudaStream_t stream) {
  LaunchKernel("launching dispatch_recv", DispatchRecvKernel, GridOf(args, FullGrid(args)),
               PlanRecv(args.layout, FullGrid(args)).shared_bytes, stream, args, io);
}

void LaunchDispatch(const NvlinkArgs& args, const DispatchSendIo& send, const DispatchRecvIo& recv,
                    cudaStream_t stream) {
  if (!args.one_kernel_ops) {
    LaunchDispatchSend(args, send, /*staged=*/false, stream);
    LaunchDispatchRecv(args, recv, stream);
    return;
  }
  LaunchKernel("launching dispatch", DispatchKernel, GridOf(args, FullGrid(args)),
               WholeSharedBytes(args), stream, args, send, recv);
}

}  // namespace jem
