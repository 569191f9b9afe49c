// Diffusion kernels: the forward (noising) process and the reverse step of DDPM, DDIM and
// DPM-Solver++, each one pass over the tensors with per-sample coefficients.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/exec.h"

namespace gk {

// The tensors are (batch, row) in memory, row = the elements of one sample. Per-sample values
// live in a float64 table coeffs[batch][k] computed by the caller from the schedule on the data's
// device, so a step reads no timestep on the host.

// q(x_t | x_0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) and the
// v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4).
enum QSampleCoeff : int { kQSignal = 0, kQNoise, kQCoeffs };

struct QSampleParams {
  void* x_t;
  void* noise;           // read when noise_given, else written with the stream's normals
  void* velocity;        // optional output
  const void* x0;
  const double* coeffs;  // [batch][kQCoeffs]
  int64_t batch, row;
  bool noise_given;
  DType dtype;
  const int64_t* seed;   // the Philox stream when the noise is drawn

  void check() const {
    require(batch >= 0 && row >= 0, "q_sample: negative size");
    require(batch == 0 || row == 0 || (x_t && noise && x0 && coeffs), "q_sample: null pointer");
    require(noise_given || seed, "q_sample: no noise and no seed");
  }
};

// One reverse step as an affine map of the sample x, the model output e (or the guided mix of two
// outputs), the predicted clean sample x0 and noise, with per-sample coefficients:
//   e    = s * (m + w (c - m))                           classifier-free guidance, s its rescale
//   x0   = clamp(a_x x + a_e e, lo, hi) / div             clipping or dynamic thresholding
//   eps  = b_x x + b_e e + b_0 x0                         the noise the step follows
//   prev = o_0 x0 + o_e eps + o_x x + o_p x0_prev + std z
// with z the stream's normal (or given noise) and std per sample, times, with a predicted
// variance v per element, sqrt(v) ("learned") or exp((lmin + (v + 1) / 2 (lmax - lmin)) / 2)
// ("learned_range"). DDPM, DDIM and DPM-Solver++(2M) are settings of these coefficients.
enum StepCoeff : int {
  kGuideW = 0, kGuideScale,
  kX0FromX, kX0FromE, kClipLo, kClipHi, kClipDiv,
  kEpsFromX, kEpsFromE, kEpsFromX0,
  kOutX0, kOutEps, kOutX, kOutPrevX0, kNoiseStd,
  kLogVarMin, kLogVarMax,
  kStepCoeffs
};

enum class VarianceInput : int { none = 0, learned = 1, learned_range = 2 };

struct DiffusionStepParams {
  void* prev;               // optional: without it only x0 is written
  void* x0;                 // optional output of the predicted clean sample
  const void* sample;
  const void* model;        // the model output, or the unconditional one with guidance
  const void* model_cond;   // optional: the conditional output (guidance)
  const void* variance;     // optional: the predicted variance values (VarianceInput)
  const void* prev_x0;      // optional: the previous step's x0 (multistep solvers)
  const void* noise;        // optional: given noise; otherwise drawn from `seed` when needed
  const double* coeffs;     // [batch][kStepCoeffs]
  int64_t batch, row;
  VarianceInput variance_input;
  DType dtype;
  const int64_t* seed;      // null: no noise

  void check() const {
    require(batch >= 0 && row >= 0, "diffusion_step: negative size");
    require(batch == 0 || row == 0 || (sample && model && coeffs && (prev || x0)), "diffusion_step: null pointer");
    require((variance_input == VarianceInput::none) == (variance == nullptr),
            "diffusion_step: a variance input needs a variance mode and the reverse");
    require(!(noise && seed), "diffusion_step: both given noise and a seed");
  }
};

GK_DECLARE_PER_ISA(void q_sample(const QSampleParams&, const CpuExec&))
GK_DECLARE_PER_ISA(void diffusion_step(const DiffusionStepParams&, const CpuExec&))
void q_sample(const QSampleParams&, const CpuExec&);
void q_sample(const QSampleParams&, const CudaExec&);
void diffusion_step(const DiffusionStepParams&, const CpuExec&);
void diffusion_step(const DiffusionStepParams&, const CudaExec&);

}  // namespace gk
