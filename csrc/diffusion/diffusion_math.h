// The per-element math of the diffusion kernels, shared by the CPU and CUDA kernels. The
// per-sample coefficients (diffusion.h) carry the schedule; these functions only combine.
#pragma once

#include <math.h>

#include "common/hostdevice.h"
#include "common/portable_math.h"
#include "diffusion/diffusion.h"

namespace gk {

GK_HD float square_root(float x) { return sqrtf(x); }
GK_HD double square_root(double x) { return ::sqrt(x); }

// x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, as diffusers' add_noise rounds it.
template <class C>
GK_HD C noised(const C* k, C x0, C eps) {
  return k[kQSignal] * x0 + k[kQNoise] * eps;
}

// v = sqrt(abar) eps - sqrt(1 - abar) x0, as diffusers' get_velocity rounds it.
template <class C>
GK_HD C velocity(const C* k, C x0, C eps) {
  return k[kQSignal] * eps - k[kQNoise] * x0;
}

// Classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + w (cond - uncond), times the
// per-sample rescale of Lin et al. 2023 (sec. 3.4).
template <class C>
GK_HD C guided(const C* k, C uncond, C cond) {
  return k[kGuideScale] * (uncond + k[kGuideW] * (cond - uncond));
}

// The predicted clean sample, clipped to [lo, hi] and divided by div (dynamic thresholding,
// Saharia et al. 2022). NaN stays NaN, as with torch.clamp.
template <class C>
GK_HD C predicted_x0(const C* k, C x, C e) {
  C x0 = k[kX0FromX] * x + k[kX0FromE] * e;
  x0 = x0 < k[kClipLo] ? k[kClipLo] : x0;
  x0 = x0 > k[kClipHi] ? k[kClipHi] : x0;
  return x0 / k[kClipDiv];
}

// Standard deviation of the step's noise from a predicted variance value v.
template <class C>
GK_HD C predicted_std(const C* k, VarianceInput input, C v) {
  if (input == VarianceInput::learned) return square_root(v);
  const C frac = (v + C(1)) / C(2);  // learned_range: interpolate log-variances (Nichol & Dhariwal 2021, eq. 15)
  return exp(C(0.5) * (frac * k[kLogVarMax] + (C(1) - frac) * k[kLogVarMin]));
}

// x_{t_prev} from the step's inputs; std is the noise scale, z the normal.
template <class C>
GK_HD C stepped(const C* k, C x, C e, C x0, C x0_prev, C std, C z) {
  const C eps = k[kEpsFromX] * x + k[kEpsFromE] * e + k[kEpsFromX0] * x0;
  return k[kOutX0] * x0 + k[kOutEps] * eps + k[kOutX] * x + k[kOutPrevX0] * x0_prev + std * z;
}

}  // namespace gk
