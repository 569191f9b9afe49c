// Uses every wrapper of ptx.h and launch.h in one kernel. test_emulator.py
// compiles this file with nvcc (-Werror all-warnings) to check the inline
// PTX, and links it into the emulated self-tests, which run it.
#include <cstdint>

#include "common/launch.h"
#include "common/ptx.h"

__global__ void __launch_bounds__(32) use_every_wrapper(const float4* __restrict__ in, float* __restrict__ out) {
  GK_DYNAMIC_SMEM(float4, staged);
  GK_DYNAMIC_SMEM(float, staged_floats);  // a second view of the same bytes
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const unsigned lane = threadIdx.x;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(in);
  gk::cp_async_16(&staged[lane], &in[lane]);
  gk::cp_async_commit();
  gk::cp_async_ca<16>(&tile[lane * 8], &in[lane]);
  gk::cp_async_commit();
  gk::cp_async_wait<1>();
  gk::cp_async_ca<8>(&tile[lane * 8], &words[lane * 4]);
  gk::cp_async_ca<4>(&tile[lane * 8 + 4], &words[lane * 4 + 2]);
  gk::cp_async_commit();
  gk::cp_async_wait<0>();
  gk::cp_async_wait_all();
  __syncwarp();

  const void* row = &tile[lane * 8];
  uint32_t x1[1], x2[2], x4[4], t1[1], t2[2], t4[4];
  gk::ldmatrix_x1(x1, row);
  gk::ldmatrix_x2(x2, row);
  gk::ldmatrix_x4(x4, row);
  gk::ldmatrix_x1_trans(t1, row);
  gk::ldmatrix_x2_trans(t2, row);
  gk::ldmatrix_x4_trans(t4, row);
  const uint32_t b[2] = {x2[0], t2[1]};
  float d[4];
  const float c[4] = {staged[lane].x, staged[lane].y, staged[lane].z, staged_floats[4 * lane + 3]};
  gk::mma_m16n8k16_f16f32(d, x4, b, c);
  gk::mma_m16n8k16_bf16f32(d, t4, b, d);
  out[lane] = d[0] + d[1] + d[2] + d[3] + float(x1[0] == t1[0]);
}

void launch_every_wrapper(const float4* in, float* out, cudaStream_t stream) {
  gk::launch(use_every_wrapper, dim3(1), dim3(32), 32 * sizeof(float4), stream, in, out);
}
