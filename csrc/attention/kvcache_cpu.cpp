#include "attention/kvcache.h"

#include <cstring>
#include <string>

namespace gk {

void kvcache_append(const KvCacheAppendParams& p) {
  require(p.batch >= 0 && p.heads >= 0 && p.capacity >= 0 && p.appended >= 0 && p.dim_qk >= 0 && p.dim_v >= 0,
          "kvcache_append: negative size");
  require(p.seqlens_dtype == DType::i32 || p.seqlens_dtype == DType::i64, "kvcache_append: lengths must be int32 or int64");
  require(p.batch == 0 || (p.cache_seqlens && p.kv_lens), "kvcache_append: null lengths");
  require(p.appended == 0 || p.batch * p.heads == 0 || (p.key && p.value && p.key_cache && p.value_cache),
          "kvcache_append: null key, value or cache");
  for (int d = 0; d < 3; ++d)
    require(p.key_cache_stride[d] >= 0 && p.value_cache_stride[d] >= 0 && p.key_stride[d] >= 0 && p.value_stride[d] >= 0,
            "kvcache_append: negative stride");
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.seqlens_dtype == DType::i32 ? static_cast<const int32_t*>(p.cache_seqlens)[b]
                                                      : static_cast<const int64_t*>(p.cache_seqlens)[b];
    if (len < 0 || len + p.appended > p.capacity)
      throw std::invalid_argument("attention_with_kvcache(): cache_seqlens + new tokens must lie in [0, " +
                                  std::to_string(p.capacity) + "], got " + std::to_string(len) + " + " +
                                  std::to_string(p.appended) + " for sequence " + std::to_string(b));
    p.kv_lens[b] = static_cast<int32_t>(len + p.appended);
  }
  const int64_t size = static_cast<int64_t>(dtype_size(p.dtype));
  auto copy_rows = [&](void* cache, const int64_t* cache_stride, const void* src, const int64_t* src_stride, int64_t dim) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t first = p.kv_lens[b] - p.appended;
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t i = 0; i < p.appended; ++i)
          std::memmove(static_cast<char*>(cache) + size * (b * cache_stride[0] + h * cache_stride[1] + (first + i) * cache_stride[2]),
                      static_cast<const char*>(src) + size * (b * src_stride[0] + h * src_stride[1] + i * src_stride[2]),
                      static_cast<size_t>(size * dim));
    }
  };
  if (p.appended == 0) return;
  copy_rows(p.key_cache, p.key_cache_stride, p.key, p.key_stride, p.dim_qk);
  copy_rows(p.value_cache, p.value_cache_stride, p.value, p.value_stride, p.dim_v);
}

}  // namespace gk
