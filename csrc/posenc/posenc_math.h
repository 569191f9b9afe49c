// The math of sinusoidal encodings, shared by the CPU and CUDA kernels.
//
// Pair i of a d-dimensional encoding has frequency w_i = base^(-i / (d/2 - shift)) and angle
// a = scale * (p * w_i) (Vaswani et al. 2017, section 3.5, with diffusers' shift and scale);
// sin a and cos a go to columns (2i, 2i+1) in the interleaved layout of the Transformer paper,
// or (i, d/2 + i) in the concatenated layout of tensor2tensor and diffusers, swapped by `flip`.
// An odd d leaves the last column zero.
#pragma once

#include "common/hostdevice.h"
#include "common/dtype.h"
#include "common/portable_math.h"

namespace gk {

struct SinusoidalSpec {
  int64_t dim;
  double log_base;          // ln(base)
  double freq_denominator;  // dim/2 - downscale_freq_shift
  double scale;
  bool interleaved;
  bool flip;

  GK_HD int64_t pairs() const { return dim / 2; }
  // Columns of pair i: sin at stride * i + sin_offset, cos at stride * i + cos_offset.
  GK_HD int64_t stride() const { return interleaved ? 2 : 1; }
  GK_HD int64_t second_offset() const { return interleaved ? 1 : pairs(); }
  GK_HD int64_t sin_offset() const { return flip ? second_offset() : 0; }
  GK_HD int64_t cos_offset() const { return flip ? 0 : second_offset(); }

  // w_i, computed in double and rounded once to the compute type.
  template <class T>
  GK_HD T frequency(int64_t i) const {
    return static_cast<T>(exp(-log_base * static_cast<double>(i) / freq_denominator));
  }

  // sin and cos of the angle of `position` at frequency `freq`.
  template <class T>
  GK_HD void sin_cos(T position, T freq, T* s, T* c) const {
    sincos(static_cast<T>(scale) * (position * freq), s, c);
  }

  void check() const {
    require(dim > 0, "sinusoidal encoding: dim must be positive");
    require(pairs() == 0 || freq_denominator != 0.0, "sinusoidal encoding: dim/2 - downscale_freq_shift must not be 0");
  }
};

}  // namespace gk
