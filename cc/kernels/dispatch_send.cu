// dispatch, send half: count, pack and store each token once into every destination rank's
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
#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// A piece is the tokens a block packs at a time.
__host__ __device__ inline Plan PlanSend(const Layout& lay, int full_grid) {
  Plan p;
  p.piece = CeilDiv(lay.max_tokens, full_grid);
  const int64_t R = lay.num_ranks, E = lay.num_experts, k = lay.experts_per_token;
  const int64_t piece = p.piece;
  p.shared_bytes = (piece + 1) * R * 16 +            // record and slot-rank pointers
                   lay.max_tokens * 8 +              // dest masks of every token
                   4 * (8 + 3 * R + 2 * E +          // verdicts, counts
                        piece * (2 * R + k));        // record index, first slot, slot rank
  return p;
}

// Where this rank's route row, slot ranks and records for destination d go.
struct Destination {
  Arena me, dest;  // `me` holds the outbox: this rank's arena, or its fabric buffer
  int rank, d;
  bool outbox;

  __device__ __forceinline__ int32_t* route() const {
    return outbox ? me.outbox_route(d) : dest.route_row(rank);
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
                     fabric || (staged && d != a.rank && !((a.same_gpu_mask >> d) & 1))};
}

__global__ void __launch_bounds__(kThreads, 2)
    DispatchSendKernel(const __grid_constant__ NvlinkArgs a, const DispatchSendIo io,
                       bool staged) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token, E = lay.num_experts;
  const int T = lay.max_tokens;
  const int L = static_cast<int>(lay.local_experts());
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const Plan plan = PlanSend(lay, FullGrid(a));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const bool in_turn = InTurn(a, st->dispatch_step, /*send=*/true, StepPhase::kDispatch);
  const uint64_t step = st->dispatch_step[0] + 1;

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
  int32_t* s_etot = s_epre + E;        // [E] slots per expert, all tokens (block 0)
  int32_t* s_index = s_etot + E;       // [piece][R] record index per destination, -1 = none
  int32_t* s_first = s_index + piece * R;  // [piece][R] first slot naming each destination
  int32_t* s_rank = s_first + piece * R;   // [piece][k] slot rank within its expert

  const int32_t raw_num_tokens = *io.num_tokens;
  const bool bad_num_tokens = raw_num_tokens < 0 || raw_num_tokens > T;
  const int nt = bad_num_tokens ? 0 : raw_num_tokens;
  const int per_block = static_cast<int>(CeilDiv(T, gridDim.x));
  const int start = static_cast<int>(Min(T, blockIdx.x * per_block));
  const int end = static_cast<int>(Min(start + per_block, T));  // this block's rows
  const int own_end = Min(end, nt);  // tokens this block packs: [start, own_end)

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
  // this block's range; of all tokens in block 0). A thread takes whole tokens, so that the
  // masks need no atomics and nothing is divided by k; its slots' loads go out together.
  const SmallDiv rank_of(L);
  for (int t = tid; t < T; t += kThreads) {
    uint64_t mask = 0;
    for (int i0 = 0; t < nt && i0 < k; i0 += 8) {
      int32_t ev[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) ev[u] = i0 + u < k ? io.topk_ids[t * k + i0 + u] : -1;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int32_t e = ev[u];
        if (e < -1 || e >= E) {
          atomicMin(s_bad, t * k + i0 + u);
        } else if (e >= 0) {
          mask |= uint64_t{1} << rank_of(e);
          if (t < start) atomicAdd(&s_epre[e], 1);
          if (blockIdx.x == 0) atomicAdd(&s_etot[e], 1);
        }
      }
    }
    s_mask[t] = mask;
  }
  const bool ok = __syncthreads_and(credited) != 0;
  const bool bad = bad_num_tokens || s_bad[0] != INT32_MAX;

  // Tokens per destination, warp by warp.
  for (int base = warp * 32; base < nt; base += kThreads) {
    const int t = base + lane;
    const uint64_t m = t < nt ? s_mask[t] : 0;
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
    for (int d = 0; d < R; ++d) {
      s_base[d] = offset;
      offset += bad ? 0 : s_tot[d];
    }
  }
  for (int d = tid; d < R; d += kThreads) {
    const Destination dst = DestinationOf(a, staged, d);
    s_rec0[d] = dst.record(0);
    s_ranks0[d] = dst.slot_rank(0);
  }

  if (blockIdx.x == 0) {
    if (tid == 0 && bad) {
      if (bad_num_tokens) {
        SetError(a, DeviceError::kBadNumTokens, raw_num_tokens, 0, 0);
      } else {
        const int32_t at = s_bad[0];
        SetError(a, DeviceError::kBadExpertId, at / k, at % k, io.topk_ids[at]);
      }
    }
    for (int d = tid; d < R; d += kThreads) io.send_tokens[d] = bad ? 0 : s_tot[d];
    // The route row, to every rank (this one included).
    if (ok) {
      const NvlinkLayout& nl = me.nl;
      const int entry = static_cast<int>(nl.route_entry_ints());
      const int row = static_cast<int>(nl.route_row_ints());
      for (int x = tid; x < R * row; x += kThreads) {
        const int p = x / row, w = x % row;
        const int d = w / entry, j = w % entry;
        int32_t v;
        if (bad) {
          v = w == 0 ? kRouteFailed : 0;
        } else {
          v = j == 0 ? s_tot[d] : s_etot[d * L + j - 1];
        }
        DestinationOf(a, staged, p).route()[w] = v;
      }
    }
  }

  // This block's rows, a piece at a time: rows [lo, hi), of which [lo, lo + ntok) are packed.
  for (int lo = start; lo < end; lo += piece) {
    const int hi = Min(lo + piece, end);
    const int ntok = Min(hi, own_end) > lo ? Min(hi, own_end) - lo : 0;

    // Record index per destination, the first slot naming each destination, and slot ranks in
    // (token, slot) order: warp 0, in order, carrying s_pre and s_epre to the next piece.
    if (warp == 0 && !bad) {
      for (int i = lane; i < ntok * R; i += 32) s_first[i] = k;
      __syncwarp();
      for (int tile = lo; tile < lo + ntok; tile += 32) {
        const int t = tile + lane;
        const uint64_t mask = t < lo + ntok ? s_mask[t] : 0;
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
      for (int tile = lo; tile < lo + ntok; tile += per_pass) {
        const int t = tile + lane / k;
        const int i = lane % k;
        const bool valid = lane < per_pass * k && t < lo + ntok;
        const int32_t e = valid ? io.topk_ids[t * k + i] : -1;
        const unsigned same = __match_any_sync(kFullMask, e);
        // Lanes run in slot order, so the lowest lane of a (token, destination) is its first.
        const unsigned same_dest = __match_any_sync(kFullMask, e >= 0 ? t * R + e / L : -1);
        if (valid) s_rank[(t - lo) * k + i] = e >= 0 ? s_epre[e] + __popc(same & LaneMaskLt()) : -1;
        if (e >= 0 && lane == __ffs(same_dest) - 1) s_first[(t - lo) * R + e / L] = i;
        __syncwarp();
        if (e >= 0 && lane == __ffs(same) - 1) s_epre[e] += __popc(same);
        __syncwarp();
      }
    }
    __syncthreads();

    // send_index for every row of this piece: the first slot naming a destination carries the
    // token's record index there.
    for (int x = tid; x < (hi - lo) * k; x += kThreads) {
      const int lt = x / k, i = x % k;
      int32_t index = -1;
      if (!bad && lt < ntok) {
        const int32_t e = io.topk_ids[lo * k + x];
        const int d = e / L;
        if (e >= 0 && s_first[lt * R + d] == i) index = s_base[d] + s_index[lt * R + d];
      }
      io.send_index[lo * k + x] = index;
    }
    for (int x = tid; !bad && x < ntok * R; x += kThreads) {
      const int32_t j = s_index[x];
      s_rec[x] = j >= 0 ? s_rec0[x % R] + j * lay.record_bytes() : nullptr;
      s_ranks[x] = j >= 0 ? s_ranks0[x % R] + j * k : nullptr;
    }
    __syncthreads();

    if (ok && !bad) {
      const int x_vecs = static_cast<int>(lay.x_bytes() / 16);
      const auto* x = static_cast<const uint8_t*>(io.x) + static_cast<int64_t>(lo) * lay.x_bytes();
      // x: 16-byte vectors, each loaded once and stored to every destination of its token.
      Batched<4>(
          tid, ntok * x_vecs, [&](int w) { return LoadInput16(x + static_cast<int64_t>(w) * 16); },
          [&](int w, int4 v) {
            const int lt = w / x_vecs, c = w % x_vecs;
            for (uint64_t m = s_mask[lo + lt]; m; m &= m - 1) {
              Store16(s_rec[lt * R + __ffsll(m) - 1] + c * 16, v);
            }
          });
      // scales
      const int S = static_cast<int>(lay.num_scales());
      for (int w = tid; w < ntok * S; w += kThreads) {
        const int lt = w / S, c = w % S;
        const float s = io.x_scale[static_cast<int64_t>(lo) * S + w];
        for (uint64_t m = s_mask[lo + lt]; m; m &= m - 1) {
          reinterpret_cast<float*>(s_rec[lt * R + __ffsll(m) - 1] + lay.scale_offset())[c] = s;
        }
      }
      // metadata and slot ranks: one thread per (token, destination, slot)
      for (int w = tid; w < ntok * R * k; w += kThreads) {
        const int lt = w / (R * k), d = w / k % R, i = w % k;
        uint8_t* rec = s_rec[lt * R + d];
        if (rec == nullptr) continue;
        const int t = lo + lt;
        const int32_t e = io.topk_ids[t * k + i];
        const bool here = e >= 0 && e / L == d;
        reinterpret_cast<int32_t*>(rec + lay.expert_offset())[i] = here ? e % L : -1;
        reinterpret_cast<float*>(rec + lay.weight_offset())[i] =
            here ? io.topk_weights[t * k + i] : 0.0f;
        s_ranks[lt * R + d][i] = here ? s_rank[lt * k + i] : -1;
        if (i == 0) {
          *reinterpret_cast<int32_t*>(rec + lay.src_token_offset()) = t;
          for (int64_t b = lay.weight_offset() + 4 * k; b < lay.record_bytes(); b += 4) {
            *reinterpret_cast<int32_t*>(rec + b) = 0;
          }
        }
      }
    }
    if (lo + piece < end) __syncthreads();  // the next piece rewrites what the copies read
  }

  if (!in_turn) return;
  if (LastBlock(a, kTicketDispatchSend, step)) {
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
    for (int d = tid; a.fabric_mask != 0 && d < R; d += kThreads) {
      a.mailbox->dispatch_counts[d] = IsFabric(a, d) && !bad ? s_tot[d] : 0;
    }
    Publish(a, &a.mailbox->dispatch_sent, step);
  }
}

}  // namespace

void LoadDispatchSend(const NvlinkArgs& args) {
  LoadKernels("loading dispatch_send", PlanSend(args.layout, FullGrid(args)).shared_bytes,
              DispatchSendKernel);
}

void LaunchDispatchSend(const NvlinkArgs& args, const DispatchSendIo& io, bool staged,
                        cudaStream_t stream) {
  const int grid = GridOf(args, Min(args.layout.max_tokens, FullGrid(args)));
  LaunchKernel("launching dispatch_send", DispatchSendKernel, grid,
               PlanSend(args.layout, FullGrid(args)).shared_bytes, stream, args, io, staged);
}

}  // namespace jem
