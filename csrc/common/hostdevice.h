// GK_HD marks the math shared by the CPU kernels and the CUDA kernels: host and device code under
// nvcc (and under the CPU emulation of CUDA), a plain inline function under a host compiler.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(GK_EMULATE)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline __attribute__((always_inline))
#endif

// Fully unrolls the loop that follows: nvcc's device passes and the host compiler each take
// their own pragma; nvcc's host pass takes neither.
#if defined(__CUDA_ARCH__)
#define GK_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define GK_UNROLL
#else
#define GK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gk {

GK_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

GK_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

}  // namespace gk
