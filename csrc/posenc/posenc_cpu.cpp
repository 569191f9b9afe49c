// CPU kernels for sinusoidal encodings. Compiled once per instruction set (common/cpu_isa.h).
#include <new>

#include "common/cpu_memory.h"
#include "common/parallel.h"
#include "posenc/posenc.h"

namespace gk {
namespace GK_ISA {
namespace {

// Pairs per tile: the sin/cos loop over a tile vectorises, then values go to their columns.
constexpr int64_t kTile = 64;

// Fills one row of the encoding at `position` from the frequency table freq[0, pairs).
template <class T>
void encode_row(const SinusoidalSpec& spec_ref, const T* freq, T position, T* row) {
  const SinusoidalSpec spec = spec_ref;  // a local copy: stores to row cannot alias it
  const int64_t pairs = spec.pairs(), stride = spec.stride();
  T* sin_col = row + spec.sin_offset();
  T* cos_col = row + spec.cos_offset();
  T s[kTile], c[kTile];
  for (int64_t i0 = 0; i0 < pairs; i0 += kTile) {
    const int64_t count = pairs - i0 < kTile ? pairs - i0 : kTile;
    for (int64_t j = 0; j < count; ++j) spec.sin_cos(position, freq[i0 + j], &s[j], &c[j]);
    if (stride == 2) {
      for (int64_t j = 0; j < count; ++j) {
        sin_col[2 * (i0 + j)] = s[j];
        cos_col[2 * (i0 + j)] = c[j];
      }
    } else {
      for (int64_t j = 0; j < count; ++j) {
        sin_col[i0 + j] = s[j];
        cos_col[i0 + j] = c[j];
      }
    }
  }
  if (spec.dim % 2 != 0) row[spec.dim - 1] = T(0);
}

// The frequency table w_0 .. w_{pairs-1}, owned for the duration of one call.
template <class T>
struct FrequencyTable {
  explicit FrequencyTable(const SinusoidalSpec& spec) : data(static_cast<T*>(::operator new(sizeof(T) * (spec.pairs() + 1)))) {
    for (int64_t i = 0; i < spec.pairs(); ++i) data[i] = spec.frequency<T>(i);
  }
  ~FrequencyTable() { ::operator delete(data); }
  FrequencyTable(const FrequencyTable&) = delete;
  FrequencyTable& operator=(const FrequencyTable&) = delete;
  T* data;
};

template <class T>
void table(const SinusoidalParams& p, int threads) {
  const FrequencyTable<T> freq(p.spec);
  const T* positions = static_cast<const T*>(p.positions);
  T* out = static_cast<T*>(p.out);
  const int64_t dim = p.spec.dim;
  parallel_for(p.n, 1 + 16384 / dim, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) encode_row(p.spec, freq.data, positions[r], out + r * dim);
  });
}

template <class T>
void add_table(const AddPositionalParams& p, int threads) {
  const FrequencyTable<T> freq(p.spec);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t dim = p.spec.dim, len = p.len, rows = p.rows;
  const T x_scale = static_cast<T>(p.x_scale);
  // Each task encodes its positions once and applies them to every row (batch element).
  parallel_for(len, 1 + 16384 / (dim * (rows > 0 ? rows : 1)), threads, [&](int64_t begin, int64_t end) {
    T* pe = static_cast<T*>(::operator new(sizeof(T) * dim));
    for (int64_t l = begin; l < end; ++l) {
      encode_row(p.spec, freq.data, static_cast<T>(p.offset + l), pe);
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t base = (b * len + l) * dim;
        for (int64_t d = 0; d < dim; ++d) out[base + d] = x[base + d] * x_scale + pe[d];
      }
    }
    ::operator delete(pe);
  });
}

}  // namespace

void sinusoidal_encoding(const SinusoidalParams& p, const CpuExec& exec) {
  switch (p.dtype) {
    case DType::f32: return table<float>(p, exec.threads);
    case DType::f64: return table<double>(p, exec.threads);
    default: return;  // rejected by the dispatcher's check
  }
}

void add_positional_encoding(const AddPositionalParams& p, const CpuExec& exec) {
  switch (p.dtype) {
    case DType::f32: return add_table<float>(p, exec.threads);
    case DType::f64: return add_table<double>(p, exec.threads);
    default: return;
  }
}

}  // namespace GK_ISA

#ifdef GK_ISA_baseline
// Entry points: check once, then run the build for the best instruction set of this CPU.
void sinusoidal_encoding(const SinusoidalParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("sinusoidal_encoding", p.dtype, "cpu", false);
  advise_huge_pages(p.out, p.n * p.spec.dim * dtype_size(p.dtype));
  GK_CPU_DISPATCH(sinusoidal_encoding, p, exec);
}

void add_positional_encoding(const AddPositionalParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("add_positional_encoding", p.dtype, "cpu", false);
  advise_huge_pages(p.out, p.rows * p.len * p.spec.dim * dtype_size(p.dtype));
  GK_CPU_DISPATCH(add_positional_encoding, p, exec);
}
#endif

}  // namespace gk
