// The CUDA runtime calls made outside kernels: error checks and the current device. Host code,
// compiled by the host compiler for the bindings (and against emulate.h under emulation).
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace gk {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("genkernels: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the guard's lifetime (kernels run on the input's device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace gk
