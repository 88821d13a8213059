// How every NVLink kernel is loaded and launched: one block size, the grid under an SM budget,
// the opt-in to more dynamic shared memory than the default, and launch errors thrown as
// CudaError.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cc/kernels/nvlink_kernels.h"

namespace jem {

// Threads per block of every NVLink kernel: their __launch_bounds__ and strides assume it.
constexpr int kThreads = 512;

// The grid each kernel's work is cut for: two blocks per SM of the device (their
// __launch_bounds__). A kernel sizes its shared memory for one block's share of this grid (a
// piece), so its shared memory does not depend on the grid it is launched with.
__host__ __device__ inline int FullGrid(const NvlinkArgs& a) { return 2 * a.num_sms; }

// Into how many parts a kernel cuts each of `records` records of `items` items (16-byte
// vectors) when there are fewer records than blocks in the full grid (decode), so that more
// blocks share the work: at most the blocks per record, and no part shorter than a block's
// one pass over it (kThreads items), since a shorter one costs a block as much as a whole.
__host__ __device__ inline int PartsPerRecord(int64_t records, int items, int full_grid) {
  if (records <= 0 || records >= full_grid) return 1;
  return static_cast<int>(Min(full_grid / records, CeilDiv(items, kThreads)));
}

// The grid of a kernel that wants `blocks` (at most FullGrid). Under an SM budget, at most
// max_sms blocks: a grid of n blocks cannot occupy more than n SMs, whereas two blocks per SM
// of the budget could land on twice as many. Each block then takes several pieces.
inline int GridOf(const NvlinkArgs& a, int64_t blocks) {
  const bool budget = a.max_sms > 0 && a.max_sms < a.num_sms;
  return static_cast<int>(budget ? Min(blocks, a.max_sms) : blocks);
}

// How a kernel cuts its work: the items (tokens, records) a block takes at a time, its share of
// the full grid, and the dynamic shared memory that one piece needs.
struct Plan {
  int64_t piece;
  int64_t shared_bytes;
};

// Loads `kernels` now rather than at their first launch (see LoadNvlinkKernels), and checks
// that a block of each gets `shared_bytes` of dynamic shared memory on the current device.
template <typename... Kernels>
void LoadKernels(const char* name, int64_t shared_bytes, Kernels... kernels) {
  int device = 0, limit = 0;
  CheckCuda(cudaGetDevice(&device), name);
  CheckCuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
            name);
  auto load = [&](auto kernel) {
    cudaFuncAttributes attr;
    CheckCuda(cudaFuncGetAttributes(&attr, kernel), name);
    if (shared_bytes + static_cast<int64_t>(attr.sharedSizeBytes) > limit) {
      throw LayoutError(std::string(name) + ": this layout needs " +
                        std::to_string(shared_bytes + attr.sharedSizeBytes) +
                        " bytes of shared memory per block, more than the " +
                        std::to_string(limit) + " of GPU " + std::to_string(device) +
                        "; lower max_tokens_per_rank, num_experts or the ranks");
    }
  };
  (load(kernels), ...);
}

// Whether every block of `kernel`'s grid (GridOf the full grid) with `shared_bytes` fits on
// the device at once, as a kernel whose blocks wait for each other needs.
template <typename Kernel>
bool CoResident(const char* name, Kernel kernel, int64_t shared_bytes, const NvlinkArgs& a) {
  if (shared_bytes > 48 * 1024) {
    CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared_bytes)),
              name);
  }
  int per_sm = 0;
  CheckCuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                          static_cast<size_t>(shared_bytes)),
            name);
  return static_cast<int64_t>(per_sm) * a.num_sms >= GridOf(a, FullGrid(a));
}

// Enqueues kernel<<<grid, kThreads, shared_bytes, stream>>>(args...).
template <typename Kernel, typename... Args>
void LaunchKernel(const char* name, Kernel kernel, int grid, int64_t shared_bytes,
                  cudaStream_t stream, const Args&... args) {
  if (shared_bytes > 48 * 1024) {
    CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared_bytes)),
              name);
  }
  kernel<<<grid, kThreads, shared_bytes, stream>>>(args...);
  CheckCuda(cudaGetLastError(), name);
}

}  // namespace jem
