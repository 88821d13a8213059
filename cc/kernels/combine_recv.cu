// combine, recv half (home side): wait for every expert rank's ready flag, then sum, for each
// token, the partials its records came back with (float32 accumulation), and give every
// expert rank the credit to reuse its partial slot here. Rows at or past num_tokens are zero.
// Blocks own contiguous token ranges, which they sum in pieces of at most the full grid's share
// (one piece unless an SM budget shrank the grid).
#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// Tokens a block sums at a time.
__host__ __device__ inline int64_t PieceTokens(const Layout& lay, int full_grid) {
  return CeilDiv(lay.max_tokens, full_grid);
}

__host__ __device__ inline int64_t RecvSharedBytes(const Layout& lay, int full_grid) {
  const int64_t R = lay.num_ranks, k = lay.experts_per_token;
  return AlignUp(4 * (4 + R + 1), 8) + PieceTokens(lay, full_grid) * k * 8;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    CombineRecvKernel(const __grid_constant__ NvlinkArgs a, const CombineRecvIo io) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int64_t T_max = lay.max_tokens;
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const int tid = threadIdx.x;

  const bool in_turn = InTurn(a, st->combine_step, /*send=*/false, StepPhase::kCombine);
  const uint64_t step = st->combine_step[1];

  extern __shared__ __align__(16) uint8_t smem[];
  const int piece = static_cast<int>(PieceTokens(lay, FullGrid(a)));
  int32_t* s_bad = reinterpret_cast<int32_t*>(smem);  // [4] operand, index, value
  int32_t* s_base = s_bad + 4;                          // [R + 1] first record per rank
  // [piece][k] each slot's partial row, null = none (8-byte aligned: 4 + R + 1 ints before)
  auto** s_src = reinterpret_cast<const uint8_t**>(smem + AlignUp(4 * (4 + R + 1), 8));

  const int32_t raw_num_tokens = *io.num_tokens;
  for (int d = tid; d < R; d += kThreads) s_base[d + 1] = io.send_tokens[d];
  __syncthreads();
  if (tid == 0) {
    s_bad[0] = -1;
    if (raw_num_tokens < 0 || raw_num_tokens > T_max) {
      s_bad[0] = static_cast<int32_t>(HandleOperand::kNumTokens);
      s_bad[1] = 0;
      s_bad[2] = raw_num_tokens;
    }
    int32_t n = 0;
    for (int d = 0; d < R; ++d) {
      const int32_t v = s_base[d + 1];
      if ((v < 0 || v > T_max) && s_bad[0] < 0) {
        s_bad[0] = static_cast<int32_t>(HandleOperand::kSendTokens);
        s_bad[1] = d;
        s_bad[2] = v;
      }
      s_base[d] = n;
      n += (v < 0 || v > T_max) ? 0 : v;
    }
    s_base[R] = n;
  }
  __syncthreads();
  const int per_block = static_cast<int>(CeilDiv(T_max, gridDim.x));
  const int start = static_cast<int>(Min(T_max, blockIdx.x * per_block));
  const int end = static_cast<int>(Min(start + per_block, T_max));  // this block's rows
  const int nt = in_turn && s_bad[0] < 0 ? raw_num_tokens : 0;

  // Where the partial of each slot of rows [lo, hi) is (own data); false, to every thread, if a
  // send_index is out of range.
  const auto find_partials = [&](int lo, int hi) {
    bool sane = true;
    for (int x = tid; x < (hi - lo) * k; x += kThreads) {
      const int t = lo + x / k;
      const int64_t at = static_cast<int64_t>(lo) * k + x;
      const int32_t index = t < nt ? io.send_index[at] : -1;
      const uint8_t* src = nullptr;
      if (index >= s_base[R] || index < -1) {
        SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kSendIndex), at,
                 index);
        sane = false;
      } else if (index >= 0) {
        int d = 0;
        while (d + 1 < R && s_base[d + 1] <= index) ++d;
        src = InboxOf(a, d).partial(d, index - s_base[d]);
      }
      s_src[x] = src;
    }
    return __syncthreads_and(sane) != 0;
  };
  // The first piece's, while the partials are on their way.
  bool sane = find_partials(start, static_cast<int>(Min(start + piece, end)));

  const bool ok = in_turn && WaitPeers(a, DeviceWait::kCombineReady, step);
  const bool good = ok && s_bad[0] < 0;
  if (blockIdx.x == 0 && tid == 0 && ok && s_bad[0] >= 0) {
    SetError(a, DeviceError::kBadHandle, s_bad[0], s_bad[1], s_bad[2]);
  }

  const int vecs = static_cast<int>(lay.combine_row_bytes() / 16);
  const int64_t out_row_bytes = static_cast<int64_t>(lay.hidden) * sizeof(T);
  auto* out = static_cast<uint8_t*>(io.out);
  for (int lo = start; lo < end; lo += piece) {
    const int hi = static_cast<int>(Min(lo + piece, end));
    if (lo != start) {
      __syncthreads();  // the last piece's sums are done with its partials' places
      sane = find_partials(lo, hi);
    }
    for (int w = tid; w < (hi - lo) * vecs; w += kThreads) {
      const int lt = w / vecs, c = w % vecs;
      float acc[Vec16<T>::kLanes] = {};
      if (good && sane) {
        for (int i0 = 0; i0 < k; i0 += 4) {
          int4 v[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u;
            if (i < k && s_src[lt * k + i] != nullptr) {
              v[u] = Load16(s_src[lt * k + i] + c * 16);
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u;
            if (i < k && s_src[lt * k + i] != nullptr) Vec16<T>::Accumulate(acc, v[u], 1.0f);
          }
        }
      }
      Store16(out + (lo + lt) * out_row_bytes + c * 16, Vec16<T>::Pack(acc));
    }
  }

  if (in_turn) {
    EndRecv(a, kTicketCombineRecv, st->combine_step, DeviceWait::kCombineCredit,
            &a.mailbox->combine_read, step);
  }
}

}  // namespace

void LoadCombineRecv(const NvlinkArgs& args) {
  LoadKernels("loading combine_recv", RecvSharedBytes(args.layout, FullGrid(args)),
              CombineRecvKernel<float>, CombineRecvKernel<__nv_bfloat16>);
}

void LaunchCombineRecv(const NvlinkArgs& args, const CombineRecvIo& io, cudaStream_t stream) {
  LaunchKernel("launching combine_recv",
               args.layout.combine_elem_bytes == 4 ? CombineRecvKernel<float>
                                                   : CombineRecvKernel<__nv_bfloat16>,
               GridOf(args, Min(args.layout.max_tokens, FullGrid(args))),
               RecvSharedBytes(args.layout, FullGrid(args)), stream, args, io);
}

}  // namespace jem
