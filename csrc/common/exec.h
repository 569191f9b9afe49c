// Where a kernel runs: the bindings build one of these from the Python side's plain integers.
#pragma once

namespace gk {

struct CpuExec {
  int threads;  // torch.get_num_threads() of the caller
};

struct CudaExec {
  int device;
  void* stream;  // cudaStream_t of the input's device (torch.cuda.current_stream)
};

}  // namespace gk
