// dispatch, send half: count, pack and store each token once into every destination rank's
// receive slot (over NVLink for peers), with the route row and the slot ranks the receiver
// needs, then raise this rank's ready flag at every destination.
//
// Staged (the dispatch_send half): what goes to a peer is packed into this rank's outbox for
// that peer instead, and the copy engine moves it (NvlinkContext), so the SMs are free for
// other work while the bytes cross NVLink; SignalStagedKernel then raises the ready flags.
//
// Blocks own contiguous token ranges. Each block counts every token (per destination rank,
// and per expert for tokens before its range), so it knows the record index of each of its
// tokens and the chunk offsets of send_index without waiting for any other block.
#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

constexpr int kThreads = 512;

struct SendPlan {
  int64_t tokens_per_block;
  int64_t shared_bytes;
};

__host__ __device__ inline SendPlan PlanSend(const Layout& lay, int grid) {
  SendPlan p;
  p.tokens_per_block = CeilDiv(lay.max_tokens, grid);
  const int64_t R = lay.num_ranks, E = lay.num_experts, k = lay.experts_per_token;
  p.shared_bytes = p.tokens_per_block * 8 +                  // dest masks
                   4 * (4 * R + 2 * E +                       // counts
                        p.tokens_per_block * (R + k));        // record index, slot rank
  return p;
}

// Where this rank's route row, slot ranks and records for destination d go.
struct Destination {
  Arena me, dest;
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
  return Destination{ArenaOf(a, a.rank), ArenaOf(a, d), a.rank, d, staged && d != a.rank};
}

__device__ __forceinline__ uint64_t DestMask(const int32_t* ids, int k, int64_t L) {
  uint64_t mask = 0;
  for (int i = 0; i < k; ++i) {
    if (ids[i] >= 0) mask |= 1ull << (ids[i] / L);
  }
  return mask;
}

__global__ void __launch_bounds__(kThreads, 2)
    DispatchSendKernel(const __grid_constant__ NvlinkArgs a, const DispatchSendIo io,
                       bool staged) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token, E = lay.num_experts;
  const int T = lay.max_tokens;
  const int64_t L = lay.local_experts();
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const SendPlan plan = PlanSend(lay, gridDim.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const uint64_t step = st->dispatch_step[0] + 1;
  if (blockIdx.x == 0 && tid == 0) st->dispatch_step[1] = step;

  extern __shared__ __align__(16) uint8_t smem[];
  const int64_t tpb = plan.tokens_per_block;
  uint64_t* s_mask = reinterpret_cast<uint64_t*>(smem);        // [tpb]
  int32_t* s_tot = reinterpret_cast<int32_t*>(s_mask + tpb);   // [R] tokens per destination
  int32_t* s_pre = s_tot + R;          // [R] tokens per destination before this block's range
  int32_t* s_base = s_pre + R;         // [R] chunk offset of each destination
  int32_t* s_bad = s_base + R;         // [R] first bad (token * k + slot), and spare
  int32_t* s_epre = s_bad + R;         // [E] slots per expert before this block's range
  int32_t* s_etot = s_epre + E;        // [E] slots per expert, all tokens (block 0)
  int32_t* s_index = s_etot + E;       // [tpb][R] record index per destination, -1 = none
  int32_t* s_rank = s_index + tpb * R; // [tpb][k] slot rank within its expert

  for (int i = tid; i < 4 * R + 2 * E; i += kThreads) s_tot[i] = i == 3 * R ? INT32_MAX : 0;
  __syncthreads();

  const int32_t raw_num_tokens = *io.num_tokens;
  const bool bad_num_tokens = raw_num_tokens < 0 || raw_num_tokens > T;
  const int64_t nt = bad_num_tokens ? 0 : raw_num_tokens;
  const int64_t start = blockIdx.x * tpb;
  const int64_t end = Min(start + tpb, T);
  const int64_t own_end = Min(end, nt);  // tokens this block packs: [start, own_end)

  // count
  for (int64_t t = tid; t < nt; t += kThreads) {
    const int32_t* ids = io.topk_ids + t * k;
    uint64_t mask = 0;
    for (int i = 0; i < k; ++i) {
      const int32_t e = ids[i];
      if (e < -1 || e >= E) {
        atomicMin(s_bad, static_cast<int32_t>(t * k + i));
        continue;
      }
      if (e < 0) continue;
      mask |= 1ull << (e / L);
      if (t < start) atomicAdd(&s_epre[e], 1);
      if (blockIdx.x == 0) atomicAdd(&s_etot[e], 1);
    }
    for (uint64_t m = mask; m; m &= m - 1) {
      const int d = __ffsll(m) - 1;
      atomicAdd(&s_tot[d], 1);
      if (t < start) atomicAdd(&s_pre[d], 1);
    }
  }
  __syncthreads();
  const bool bad = bad_num_tokens || s_bad[0] != INT32_MAX;
  if (tid == 0) {
    int32_t offset = 0;
    for (int d = 0; d < R; ++d) {
      s_base[d] = offset;
      offset += bad ? 0 : s_tot[d];
    }
  }

  // Record index per destination, and slot ranks in (token, slot) order: warp 0, in order.
  if (warp == 0 && !bad) {
    for (int64_t tile = start; tile < own_end; tile += 32) {
      const int64_t t = tile + lane;
      const uint64_t mask = t < own_end ? DestMask(io.topk_ids + t * k, k, L) : 0;
      if (t < own_end) s_mask[t - start] = mask;
      for (int d = 0; d < R; ++d) {
        const unsigned votes = __ballot_sync(kFullMask, (mask >> d) & 1);
        if (t < own_end) {
          s_index[(t - start) * R + d] =
              (mask >> d) & 1 ? s_pre[d] + __popc(votes & LaneMaskLt()) : -1;
        }
        __syncwarp();
        if (lane == 0) s_pre[d] += __popc(votes);
        __syncwarp();
      }
    }
    const int per_pass = 32 / k;  // tokens per pass, one lane per (token, slot)
    for (int64_t tile = start; tile < own_end; tile += per_pass) {
      const int64_t t = tile + lane / k;
      const int i = lane % k;
      const bool valid = lane < per_pass * k && t < own_end;
      const int32_t e = valid ? io.topk_ids[t * k + i] : -1;
      const unsigned same = __match_any_sync(kFullMask, e);
      if (valid) s_rank[(t - start) * k + i] = e >= 0 ? s_epre[e] + __popc(same & LaneMaskLt()) : -1;
      __syncwarp();
      if (e >= 0 && lane == __ffs(same) - 1) s_epre[e] += __popc(same);
      __syncwarp();
    }
  }
  __syncthreads();

  // send_index for every row of this block's range
  for (int64_t x = tid; x < (end - start) * k; x += kThreads) {
    const int64_t t = start + x / k;
    const int i = x % k;
    int32_t index = -1;
    if (!bad && t < nt) {
      const int32_t* ids = io.topk_ids + t * k;
      const int32_t e = ids[i];
      if (e >= 0) {
        const int64_t d = e / L;
        bool first = true;
        for (int j = 0; j < i; ++j) first = first && !(ids[j] >= 0 && ids[j] / L == d);
        if (first) index = s_base[d] + s_index[(t - start) * R + d];
      }
    }
    io.send_index[t * k + i] = index;
  }

  // The destinations may reuse what they received last step only once they said so.
  const bool ok = WaitPeers(a, DeviceWait::kDispatchCredit, step - 1);

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
      const int64_t entry = nl.route_entry_ints(), row = nl.route_row_ints();
      for (int64_t x = tid; x < R * row; x += kThreads) {
        const int p = x / row;
        const int64_t w = x % row;
        const int64_t d = w / entry, j = w % entry;
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

  if (ok && !bad) {
    const int64_t ntok = own_end > start ? own_end - start : 0;
    const int64_t x_vecs = lay.x_bytes() / 16;
    const uint8_t* x = static_cast<const uint8_t*>(io.x);
    // x: 16-byte vectors, each loaded once and stored to every destination of its token.
    constexpr int kUnroll = 4;
    for (int64_t base = tid; base < ntok * x_vecs; base += kThreads * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t w = base + u * kThreads;
        if (w < ntok * x_vecs) {
          const int64_t t = start + w / x_vecs;
          v[u] = LoadInput16(x + t * lay.x_bytes() + (w % x_vecs) * 16);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t w = base + u * kThreads;
        if (w < ntok * x_vecs) {
          const int64_t lt = w / x_vecs;
          for (uint64_t m = s_mask[lt]; m; m &= m - 1) {
            const int d = __ffsll(m) - 1;
            uint8_t* rec = DestinationOf(a, staged, d).record(s_index[lt * R + d]);
            Store16(rec + (w % x_vecs) * 16, v[u]);
          }
        }
      }
    }
    // scales
    const int64_t S = lay.num_scales();
    for (int64_t w = tid; w < ntok * S; w += kThreads) {
      const int64_t lt = w / S, c = w % S;
      const float s = io.x_scale[(start + lt) * S + c];
      for (uint64_t m = s_mask[lt]; m; m &= m - 1) {
        const int d = __ffsll(m) - 1;
        uint8_t* rec = DestinationOf(a, staged, d).record(s_index[lt * R + d]);
        reinterpret_cast<float*>(rec + lay.scale_offset())[c] = s;
      }
    }
    // metadata and slot ranks: one thread per (token, destination)
    for (int64_t w = tid; w < ntok * R; w += kThreads) {
      const int64_t lt = w / R;
      const int d = w % R;
      const int32_t j = s_index[lt * R + d];
      if (j < 0) continue;
      const int64_t t = start + lt;
      const Destination dst = DestinationOf(a, staged, d);
      uint8_t* rec = dst.record(j);
      int32_t* ranks = dst.slot_rank(j);
      *reinterpret_cast<int32_t*>(rec + lay.src_token_offset()) = static_cast<int32_t>(t);
      auto* experts = reinterpret_cast<int32_t*>(rec + lay.expert_offset());
      auto* weights = reinterpret_cast<float*>(rec + lay.weight_offset());
      for (int i = 0; i < k; ++i) {
        const int32_t e = io.topk_ids[t * k + i];
        const bool here = e >= 0 && e / L == d;
        experts[i] = here ? static_cast<int32_t>(e % L) : -1;
        weights[i] = here ? io.topk_weights[t * k + i] : 0.0f;
        ranks[i] = here ? s_rank[lt * k + i] : -1;
      }
      for (int64_t b = lay.weight_offset() + 4 * k; b < lay.record_bytes(); b += 4) {
        *reinterpret_cast<int32_t*>(rec + b) = 0;
      }
    }
  }

  if (LastBlock(a, kTicketDispatchSend, step)) {
    if (!staged) {
      SignalPeers(a, DeviceWait::kDispatchReady, step);
    } else if (tid == 0) {
      SignalPeer(a, DeviceWait::kDispatchReady, a.rank, step);
    }
  }
}

// After the copy engine has moved the outboxes: the ready flag of this rank's last step, at
// every peer. Thread p signals peer p.
__global__ void SignalStagedKernel(const __grid_constant__ NvlinkArgs a) {
  const int p = threadIdx.x;
  if (p >= a.layout.num_ranks || p == a.rank) return;
  __threadfence_system();
  SignalPeer(a, DeviceWait::kDispatchReady, p, ArenaOf(a, a.rank).state()->dispatch_step[1]);
}

}  // namespace

cudaError_t LoadDispatchSend() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, DispatchSendKernel);
  return err != cudaSuccess ? err : cudaFuncGetAttributes(&attr, SignalStagedKernel);
}

cudaError_t LaunchSignalStaged(const NvlinkArgs& args, cudaStream_t stream) {
  SignalStagedKernel<<<1, kMaxNvlinkRanks, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t LaunchDispatchSend(const NvlinkArgs& args, const DispatchSendIo& io, bool staged,
                               cudaStream_t stream) {
  const int grid = static_cast<int>(Min(args.layout.max_tokens, 2 * args.num_sms));
  const SendPlan plan = PlanSend(args.layout, grid);
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        DispatchSendKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(plan.shared_bytes));
    if (err != cudaSuccess) return err;
  }
  DispatchSendKernel<<<grid, kThreads, plan.shared_bytes, stream>>>(args, io, staged);
  return cudaGetLastError();
}

}  // namespace jem
