// Element types as the bindings receive them: a small integer code shared with
// python/genkernels/_backend.py, so the compiled core needs no torch types.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace gk {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3, i32 = 4, i64 = 5, b8 = 6 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64:
    case DType::i64: return 8;
    case DType::f16:
    case DType::bf16: return 2;
    case DType::b8: return 1;
    default: return 4;
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::b8: return "bool";
  }
  return "unknown";
}

inline DType to_dtype(int code) {
  if (code < 0 || code > static_cast<int>(DType::b8))
    throw std::invalid_argument("genkernels: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// Throws std::invalid_argument (ValueError in Python) when `cond` fails: the kernels' own
// re-check of what the Python layer validated, so a bad call never reaches memory.
inline void require(bool cond, const std::string& what) {
  if (!cond) throw std::invalid_argument("genkernels: " + what);
}

// Kernels compute in float32 or float64; the CUDA ones also take float16 and bfloat16 storage.
inline void require_float_dtype(const char* op, DType t, const char* device, bool half_types) {
  const bool ok = t == DType::f32 || t == DType::f64 || (half_types && (t == DType::f16 || t == DType::bf16));
  if (!ok)
    throw std::invalid_argument(std::string("genkernels: ") + op + " does not support " + dtype_name(t) + " on " +
                                device);
}

}  // namespace gk
