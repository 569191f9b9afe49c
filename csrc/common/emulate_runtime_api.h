// The part of the CUDA runtime API that host code around our kernels uses,
// for the emulator (see emulate.h): one device, host memory, streams that
// complete every operation before returning.
#pragma once

#include <driver_types.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "emulate_scheduler.h"

namespace gk_emu::detail {
inline thread_local cudaError_t last_error = cudaSuccess;

inline cudaError_t record(cudaError_t error) {
  if (error != cudaSuccess) last_error = error;
  return error;
}
}  // namespace gk_emu::detail

inline cudaError_t cudaGetLastError() { return std::exchange(gk_emu::detail::last_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return gk_emu::detail::last_error; }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "unrecognized error code";
  }
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return gk_emu::detail::record(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return gk_emu::detail::record(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : gk_emu::detail::record(cudaErrorInvalidDevice);
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Stream-ordered allocation: host memory, as emulated streams have already finished their work.
inline cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t = nullptr) {
  if (ptr == nullptr) return gk_emu::detail::record(cudaErrorInvalidValue);
  *ptr = size == 0 ? nullptr : std::malloc(size);
  return size == 0 || *ptr != nullptr ? cudaSuccess : gk_emu::detail::record(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFreeAsync(void* ptr, cudaStream_t = nullptr) {
  std::free(ptr);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t = nullptr) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize: {
      if (value < 0 || size_t(value) > gk_emu::detail::kMaxDynamicSmem)
        return gk_emu::detail::record(cudaErrorInvalidValue);
      auto& a = gk_emu::detail::kernel_attributes();
      const std::lock_guard lock(a.mutex);
      a.max_dynamic_smem[func] = size_t(value);
      return cudaSuccess;
    }
    case cudaFuncAttributePreferredSharedMemoryCarveout: return cudaSuccess;  // a hint, without effect here
    default: return gk_emu::detail::record(cudaErrorInvalidValue);
  }
}
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
