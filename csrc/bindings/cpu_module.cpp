// genkernels._C: the CPU kernels.
#include <pybind11/stl.h>

#include <array>
#include <vector>

#include "attention/kvcache.h"
#include "bindings/ops.h"
#include "common/cpu_isa.h"
#include "common/philox.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "genkernels CPU kernels";
  gk::bindings::bind_ops<gk::CpuExec>(m);
  m.attr("__version__") = GK_VERSION;
  m.attr("cpu_isas_built") = GK_CPU_ISAS;
  m.def("cpu_isa", [] { return gk::isa_name(gk::cpu_isa()); }, "Instruction set the CPU kernels use on this machine.");
  m.def(
      "attention_kvcache",
      [](int64_t threads, uintptr_t q, uintptr_t out, std::array<int64_t, 7> sizes, std::array<int64_t, 3> q_stride,
         uintptr_t key_cache, std::array<int64_t, 3> key_cache_stride, uintptr_t value_cache,
         std::array<int64_t, 3> value_cache_stride, uintptr_t key, std::array<int64_t, 3> key_stride, uintptr_t value,
         std::array<int64_t, 3> value_stride, uintptr_t cache_seqlens, int seqlens_dtype, int64_t appended, double scale,
         bool causal, int dtype) {
        namespace b = gk::bindings;
        std::vector<int32_t> kv_lens(static_cast<size_t>(sizes[0] > 0 ? sizes[0] : 0));
        gk::KvCacheAppendParams a{};
        a.key_cache = b::ptr(key_cache);
        a.value_cache = b::ptr(value_cache);
        a.key = b::ptr(key);
        a.value = b::ptr(value);
        for (int d = 0; d < 3; ++d) {
          a.key_cache_stride[d] = key_cache_stride[d];
          a.value_cache_stride[d] = value_cache_stride[d];
          a.key_stride[d] = key_stride[d];
          a.value_stride[d] = value_stride[d];
        }
        a.cache_seqlens = b::ptr(cache_seqlens);
        a.seqlens_dtype = gk::to_dtype(seqlens_dtype);
        a.kv_lens = kv_lens.data();
        a.batch = sizes[0];
        a.heads = sizes[2];
        a.capacity = sizes[4];
        a.appended = appended;
        a.dim_qk = sizes[5];
        a.dim_v = sizes[6];
        a.dtype = gk::to_dtype(dtype);
        // Bottom-right causal among the new positions: query i sees the keys up to kv_len - len_q + i.
        const gk::AttentionParams p = b::attention_params(
            q, key_cache, value_cache, out, 0, sizes, q_stride, key_cache_stride, value_cache_stride, 0, dtype, {0, 0, 0, 0},
            reinterpret_cast<uintptr_t>(kv_lens.data()), scale, -1, causal ? 0 : -1, true, 0.0, 0, dtype);
        p.check();  // before anything is written to the caches
        pybind11::gil_scoped_release nogil;
        gk::kvcache_append(a);
        gk::attention_forward(p, gk::CpuExec{static_cast<int>(threads)});
      },
      "One decoding step on the CPU: appends key/value to the caches, then attends over them.");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
        const gk::Philox4 r = gk::philox4x32_10(gk::Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      "One Philox4x32-10 block: four 32-bit words from a 128-bit counter and a 64-bit key.");
}
