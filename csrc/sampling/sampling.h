// Gaussian sampling: standard normals, the VAE's reparameterised sample, and its KL term.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/exec.h"

namespace gk {

// `seed` points at two int64 on the kernel's device: the Philox key and the stream offset.
struct NormalParams {
  void* out;
  int64_t n;
  DType dtype;
  const int64_t* seed;

  void check() const {
    require(n >= 0, "normal: negative size");
    require(seed != nullptr && (n == 0 || out != nullptr), "normal: null pointer");
  }
};

// z = mu + exp(logvar / 2) * eps, eps the standard normals of the (seed, offset) stream.
struct ReparameterizeParams {
  void* z;
  const void* mu;
  const void* logvar;
  int64_t n;
  DType dtype;
  const int64_t* seed;

  void check() const {
    require(n >= 0, "reparameterize: negative size");
    require(seed != nullptr && (n == 0 || (z != nullptr && mu != nullptr && logvar != nullptr)),
            "reparameterize: null pointer");
  }
};

// KL(N(mu, exp(logvar)) || N(0, 1)) per element into `out` (of dtype), or, with partial_sums,
// the float64 sum of each run of kKlChunk elements into out[ceil(n / kKlChunk)]: a summation
// order fixed by n alone, so the result does not depend on the thread count or the device.
constexpr int64_t kKlChunk = 4096;

struct GaussianKlParams {
  void* out;
  const void* mu;
  const void* logvar;
  int64_t n;
  DType dtype;
  bool partial_sums;

  void check() const {
    require(n >= 0, "gaussian_kl: negative size");
    require(n == 0 || (out != nullptr && mu != nullptr && logvar != nullptr), "gaussian_kl: null pointer");
  }
};

GK_DECLARE_PER_ISA(void normal(const NormalParams&, const CpuExec&))
GK_DECLARE_PER_ISA(void reparameterize(const ReparameterizeParams&, const CpuExec&))
GK_DECLARE_PER_ISA(void gaussian_kl(const GaussianKlParams&, const CpuExec&))
void normal(const NormalParams&, const CpuExec&);
void normal(const NormalParams&, const CudaExec&);
void reparameterize(const ReparameterizeParams&, const CpuExec&);
void reparameterize(const ReparameterizeParams&, const CudaExec&);
void gaussian_kl(const GaussianKlParams&, const CpuExec&);
void gaussian_kl(const GaussianKlParams&, const CudaExec&);

}  // namespace gk
