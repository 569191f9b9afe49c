// The Python bindings of every op, written once for both modules: `bind_ops<CpuExec>` in _C and
// `bind_ops<CudaExec>` in _C_cuda (and its emulated twin _C_emu).
//
// Functions take plain values, never torch types: data pointers as integers, int64 sizes, a
// dtype code, and two integers saying where to run (CPU: thread count, unused; CUDA: device
// index, stream handle). Parameters are re-checked in C++ and a violation raises ValueError.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include <cstdint>

#include "attention/attention.h"
#include "common/exec.h"
#include "diffusion/diffusion.h"
#include "posenc/posenc.h"
#include "sampling/sampling.h"

namespace gk::bindings {

namespace py = pybind11;

// Holds whatever must be in place while a kernel runs (the CUDA module makes the device current).
template <class Exec>
struct ExecScope {
  explicit ExecScope(const Exec&) {}
};

template <class Exec>
Exec make_exec(int64_t where, uintptr_t stream);

template <>
inline CpuExec make_exec<CpuExec>(int64_t threads, uintptr_t) {
  return CpuExec{static_cast<int>(threads)};
}

template <>
inline CudaExec make_exec<CudaExec>(int64_t device, uintptr_t stream) {
  return CudaExec{static_cast<int>(device), reinterpret_cast<void*>(stream)};
}

// Runs op(params, exec) with the GIL released.
template <class Exec, class Params>
void run(void (*op)(const Params&, const Exec&), const Params& params, int64_t where, uintptr_t stream) {
  const Exec exec = make_exec<Exec>(where, stream);
  py::gil_scoped_release nogil;
  ExecScope<Exec> scope(exec);
  op(params, exec);
}

inline void* ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

// The attention problem as the forward and backward bindings receive it.
inline AttentionParams attention_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                                        const std::array<int64_t, 7>& sizes, const std::array<int64_t, 3>& q_stride,
                                        const std::array<int64_t, 3>& k_stride, const std::array<int64_t, 3>& v_stride,
                                        uintptr_t mask, int mask_dtype, const std::array<int64_t, 4>& mask_stride,
                                        uintptr_t kv_lens, double scale, int64_t window_left, int64_t window_right,
                                        bool bottom_right, double dropout_p, uintptr_t seed, int dtype) {
  AttentionParams p{};
  p.q = ptr(q);
  p.k = ptr(k);
  p.v = ptr(v);
  p.out = ptr(out);
  p.lse = static_cast<float*>(ptr(lse));
  p.batch = sizes[0];
  p.heads_q = sizes[1];
  p.heads_kv = sizes[2];
  p.len_q = sizes[3];
  p.len_kv = sizes[4];
  p.dim_qk = sizes[5];
  p.dim_v = sizes[6];
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q_stride[d];
    p.k_stride[d] = k_stride[d];
    p.v_stride[d] = v_stride[d];
  }
  p.mask = ptr(mask);
  p.mask_dtype = to_dtype(mask_dtype);
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask_stride[d];
  p.kv_lens = static_cast<const int32_t*>(ptr(kv_lens));
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.dropout_p = dropout_p;
  p.seed = static_cast<const int64_t*>(ptr(seed));
  p.dtype = to_dtype(dtype);
  return p;
}

template <class Exec>
void bind_ops(py::module_& m) {
  m.def("sinusoidal_encoding",
        [](int64_t where, uintptr_t stream, uintptr_t out, uintptr_t positions, int64_t n, int dtype, int64_t dim,
           double log_base, double freq_denominator, double scale, bool interleaved, bool flip) {
          const SinusoidalParams p{ptr(out), ptr(positions), n, to_dtype(dtype),
                                   SinusoidalSpec{dim, log_base, freq_denominator, scale, interleaved, flip}};
          run<Exec>(&sinusoidal_encoding, p, where, stream);
        });
  m.def("add_positional_encoding",
        [](int64_t where, uintptr_t stream, uintptr_t out, uintptr_t x, int64_t rows, int64_t len, int dtype,
           int64_t dim, int64_t offset, double x_scale, double log_base, bool interleaved) {
          const SinusoidalSpec spec{dim, log_base, static_cast<double>(dim / 2), 1.0, interleaved, false};
          const AddPositionalParams p{ptr(out), ptr(x), rows, len, offset, x_scale, to_dtype(dtype), spec};
          run<Exec>(&add_positional_encoding, p, where, stream);
        });
  m.def("normal", [](int64_t where, uintptr_t stream, uintptr_t out, int64_t n, int dtype, uintptr_t seed) {
    const NormalParams p{ptr(out), n, to_dtype(dtype), static_cast<const int64_t*>(ptr(seed))};
    run<Exec>(&normal, p, where, stream);
  });
  m.def("reparameterize", [](int64_t where, uintptr_t stream, uintptr_t z, uintptr_t mu, uintptr_t logvar, int64_t n,
                             int dtype, uintptr_t seed) {
    const ReparameterizeParams p{ptr(z), ptr(mu), ptr(logvar), n, to_dtype(dtype),
                                 static_cast<const int64_t*>(ptr(seed))};
    run<Exec>(&reparameterize, p, where, stream);
  });
  m.def("gaussian_kl", [](int64_t where, uintptr_t stream, uintptr_t out, uintptr_t mu, uintptr_t logvar, int64_t n,
                          int dtype, bool partial_sums) {
    const GaussianKlParams p{ptr(out), ptr(mu), ptr(logvar), n, to_dtype(dtype), partial_sums};
    run<Exec>(&gaussian_kl, p, where, stream);
  });
  m.attr("KL_CHUNK") = kKlChunk;
  m.def("q_sample", [](int64_t where, uintptr_t stream, uintptr_t x_t, uintptr_t noise, uintptr_t velocity,
                       uintptr_t x0, uintptr_t coeffs, int64_t batch, int64_t row, bool noise_given, int dtype,
                       uintptr_t seed) {
    const QSampleParams p{ptr(x_t), ptr(noise), ptr(velocity), ptr(x0), static_cast<const double*>(ptr(coeffs)),
                          batch, row, noise_given, to_dtype(dtype), static_cast<const int64_t*>(ptr(seed))};
    run<Exec>(&q_sample, p, where, stream);
  });
  m.def("diffusion_step",
        [](int64_t where, uintptr_t stream, uintptr_t prev, uintptr_t x0, uintptr_t sample, uintptr_t model,
           uintptr_t model_cond, uintptr_t variance, int variance_input, uintptr_t prev_x0, uintptr_t noise,
           uintptr_t coeffs, int64_t batch, int64_t row, int dtype, uintptr_t seed) {
          require(variance_input >= 0 && variance_input <= 2, "diffusion_step: unknown variance input");
          const DiffusionStepParams p{ptr(prev), ptr(x0), ptr(sample), ptr(model), ptr(model_cond), ptr(variance),
                                      ptr(prev_x0), ptr(noise), static_cast<const double*>(ptr(coeffs)), batch, row,
                                      static_cast<VarianceInput>(variance_input), to_dtype(dtype),
                                      static_cast<const int64_t*>(ptr(seed))};
          run<Exec>(&diffusion_step, p, where, stream);
        });
  m.attr("Q_SAMPLE_COEFFS") = static_cast<int>(kQCoeffs);
  m.attr("STEP_COEFFS") = static_cast<int>(kStepCoeffs);
  m.def("attention_forward",
        [](int64_t where, uintptr_t stream, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
           std::array<int64_t, 7> sizes, std::array<int64_t, 3> q_stride, std::array<int64_t, 3> k_stride,
           std::array<int64_t, 3> v_stride, uintptr_t mask, int mask_dtype, std::array<int64_t, 4> mask_stride,
           uintptr_t kv_lens, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
           double dropout_p, uintptr_t seed, int dtype) {
          const AttentionParams p =
              attention_params(q, k, v, out, lse, sizes, q_stride, k_stride, v_stride, mask, mask_dtype, mask_stride,
                               kv_lens, scale, window_left, window_right, bottom_right, dropout_p, seed, dtype);
          run<Exec>(&attention_forward, p, where, stream);
        });
  m.def("attention_backward",
        [](int64_t where, uintptr_t stream, uintptr_t dout, std::array<int64_t, 3> dout_stride, uintptr_t dlse,
           uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t dq, uintptr_t dk,
           uintptr_t dv, uintptr_t dbias, std::array<int64_t, 7> sizes, std::array<int64_t, 3> q_stride,
           std::array<int64_t, 3> k_stride, std::array<int64_t, 3> v_stride, uintptr_t mask, int mask_dtype,
           std::array<int64_t, 4> mask_stride, double scale, int64_t window_left, int64_t window_right,
           bool bottom_right, double dropout_p, uintptr_t seed, int dtype, bool deterministic) {
          AttentionBackwardParams p{};
          p.fwd = attention_params(q, k, v, out, lse, sizes, q_stride, k_stride, v_stride, mask, mask_dtype,
                                   mask_stride, 0, scale, window_left, window_right, bottom_right, dropout_p, seed,
                                   dtype);
          p.dout = ptr(dout);
          for (int d = 0; d < 3; ++d) p.dout_stride[d] = dout_stride[d];
          p.dlse = static_cast<const float*>(ptr(dlse));
          p.dq = ptr(dq);
          p.dk = ptr(dk);
          p.dv = ptr(dv);
          p.dbias = static_cast<float*>(ptr(dbias));
          p.deterministic = deterministic;
          run<Exec>(&attention_backward, p, where, stream);
        });
}

}  // namespace gk::bindings
