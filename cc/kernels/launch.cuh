// How every NVLink kernel is loaded and launched: one block size, the opt-in to more dynamic
// shared memory than the default, and launch errors thrown as CudaError.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/nvlink_kernels.h"

namespace jem {

// Threads per block of every NVLink kernel: their __launch_bounds__ and strides assume it.
constexpr int kThreads = 512;

// Loads `kernels` now rather than at their first launch (see LoadNvlinkKernels).
template <typename... Kernels>
void LoadKernels(const char* name, Kernels... kernels) {
  cudaFuncAttributes attr;
  (CheckCuda(cudaFuncGetAttributes(&attr, kernels), name), ...);
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
