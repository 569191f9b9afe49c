// genkernels._C_cuda: the CUDA kernels. The same source builds genkernels._C_emu, the kernels
// run on CPU threads by the emulation of CUDA (common/emulate.h), for the tests.
#include "bindings/ops.h"
#include "common/cuda_device.h"

namespace gk::bindings {

// Kernels launch on the caller's stream with the tensor's device current.
template <>
struct ExecScope<CudaExec> {
  explicit ExecScope(const CudaExec& exec) : guard(exec.device) {}
  DeviceGuard guard;
};

}  // namespace gk::bindings

PYBIND11_MODULE(GK_MODULE_NAME, m) {
  m.doc() = "genkernels CUDA kernels";
  gk::bindings::bind_ops<gk::CudaExec>(m);
  m.attr("archs") = GK_CUDA_ARCHS;
  m.def(
      "device_count",
      [] {
        int count = 0;
        // No driver or no device is not an error here: it means CUDA cannot run now.
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return count;
      },
      "Number of CUDA devices the runtime can use now (0 without a driver).");
}
