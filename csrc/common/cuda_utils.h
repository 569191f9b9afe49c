// Helpers shared by the CUDA launchers: grid sizing, storage types and the dtype switch.
// Compiles under nvcc and under the CPU emulation of CUDA.
#pragma once

#include "common/launch.h"  // first: under emulation it defines the CUDA keywords

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include "common/cuda_device.h"
#include "common/dtype.h"

namespace gk {

// Blocks for `items` work items of `per_block` each, capped for grid-stride loops.
inline unsigned blocks_for(int64_t items, int64_t per_block, int64_t cap = 65535) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// The arithmetic type of a storage type: float for the 16-bit types and float, double for double.
template <class T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <class T>
using compute_t = typename Compute<T>::type;

// Scratch memory for the launches of one call, allocated on the stream and released on it when
// the launches are queued (or fail).
struct Workspace {
  void* ptr = nullptr;
  cudaStream_t stream;
  Workspace(size_t bytes, cudaStream_t s) : stream(s) { check_cuda(cudaMallocAsync(&ptr, bytes, stream), "cudaMallocAsync"); }
  ~Workspace() { cudaFreeAsync(ptr, stream); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type T of `dtype` (float, double, __half, __nv_bfloat16).
template <class F>
void dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f64: return f(TypeTag<double>{});
    case DType::f16: return f(TypeTag<__half>{});
    case DType::bf16: return f(TypeTag<__nv_bfloat16>{});
    default: require_float_dtype(op, dtype, "cuda", true);
  }
}

}  // namespace gk
