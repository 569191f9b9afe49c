// Appending a generation step's keys and values to a key/value cache, on the CPU.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace gk {

// key_cache (batch, heads, capacity, dim_qk) and value_cache (batch, heads, capacity, dim_v),
// feature dimension contiguous, other dimensions through element strides. Sequence b holds
// cache_seqlens[b] positions; the `appended` new positions of key and value (batch, heads,
// appended, dim) go after them, and kv_lens[b] = cache_seqlens[b] + appended.
struct KvCacheAppendParams {
  void* key_cache;
  void* value_cache;
  int64_t key_cache_stride[3], value_cache_stride[3];
  const void* key;    // null when nothing is appended
  const void* value;
  int64_t key_stride[3], value_stride[3];
  const void* cache_seqlens;  // (batch,) int32 or int64
  DType seqlens_dtype;
  int32_t* kv_lens;           // (batch,) output
  int64_t batch, heads, capacity, appended, dim_qk, dim_v;
  DType dtype;  // of the caches, key and value
};

// Checks every length first and throws (naming cache_seqlens) before anything is written when a
// sequence would not fit.
void kvcache_append(const KvCacheAppendParams& p);

}  // namespace gk
