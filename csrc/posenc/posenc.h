// Sinusoidal encodings of positions and timesteps: parameters and entry points.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/exec.h"
#include "posenc/posenc_math.h"

namespace gk {

// out (n, dim) = encoding of positions (n,). Positions are float32, or float64 when dtype is.
struct SinusoidalParams {
  void* out;
  const void* positions;
  int64_t n;
  DType dtype;
  SinusoidalSpec spec;

  void check() const {
    spec.check();
    require(n >= 0, "sinusoidal_encoding: negative number of positions");
    require(n == 0 || (out != nullptr && positions != nullptr), "sinusoidal_encoding: null pointer");
  }
};

// out (rows, len, dim) = x * x_scale + PE[offset + l] for the position l of each row.
struct AddPositionalParams {
  void* out;
  const void* x;
  int64_t rows, len;
  int64_t offset;
  double x_scale;
  DType dtype;
  SinusoidalSpec spec;

  void check() const {
    spec.check();
    require(rows >= 0 && len >= 0, "add_positional_encoding: negative size");
    require(rows * len * spec.dim == 0 || (out != nullptr && x != nullptr), "add_positional_encoding: null pointer");
  }
};

GK_DECLARE_PER_ISA(void sinusoidal_encoding(const SinusoidalParams&, const CpuExec&))
GK_DECLARE_PER_ISA(void add_positional_encoding(const AddPositionalParams&, const CpuExec&))
void sinusoidal_encoding(const SinusoidalParams&, const CpuExec&);
void sinusoidal_encoding(const SinusoidalParams&, const CudaExec&);
void add_positional_encoding(const AddPositionalParams&, const CpuExec&);
void add_positional_encoding(const AddPositionalParams&, const CudaExec&);

}  // namespace gk
