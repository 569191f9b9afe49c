// The one place that launches kernels: gk::launch compiles to a CUDA launch
// under nvcc and runs the CPU emulator (emulate.h) when GK_EMULATE is defined.
// GK_DYNAMIC_SMEM gives a kernel its block's dynamic shared memory in both.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(GK_EMULATE)
#include "emulate.h"
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#error "launch.h needs nvcc (a .cu file) or an emulation build (-DGK_EMULATE)"
#endif

// Declares `type* name` pointing at the block's dynamic shared memory
// (the `smem` bytes passed to gk::launch, at least 16-byte aligned).
#if defined(GK_EMULATE)
#define GK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::gk_emu::detail::dynamic_smem())
#else
#define GK_DYNAMIC_SMEM(type, name)                                 \
  extern __shared__ __align__(16) unsigned char gk_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(gk_dynamic_smem_)
#endif

namespace gk {

// Launches kernel on grid x block with `smem` bytes of dynamic shared memory
// on `stream`. Throws std::runtime_error with CUDA's message if the launch
// fails; in emulation, gk_emu::EmulationError (a std::runtime_error) for an
// invalid launch or a fault found while running the kernel.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "gk::launch: wrong number of kernel arguments");
#if defined(GK_EMULATE)
  (void)stream;  // emulated streams complete each launch before returning
  ::gk_emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    throw std::runtime_error(std::string("gk::launch: ") + cudaGetErrorString(err));
#endif
}

}  // namespace gk
