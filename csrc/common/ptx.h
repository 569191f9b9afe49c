// Wrappers for the PTX instructions our kernels use directly. Under nvcc they
// are inline asm; in emulation builds (GK_EMULATE, see emulate.h) they follow
// the PTX ISA's documented semantics on the CPU:
//
//   mma_m16n8k16_f16f32 / _bf16f32(d, a, b, c)
//       mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A*B + C
//       for a 16x16 row-major A, 16x8 column-major B and 16x8 f32 C/D, held in
//       the per-lane fragments the ISA documents.
//   ldmatrix_x1/x2/x4[_trans](r, smem_row)
//       ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lanes 8i..8i+7
//       give the row addresses of matrix i; lane t receives row t/4, columns
//       2*(t%4) and 2*(t%4)+1 of each matrix (of its transpose with _trans).
//   cp_async_16(smem, gmem)          cp.async.cg.shared.global, 16 bytes
//   cp_async_ca<Bytes>(smem, gmem)   cp.async.ca.shared.global, 4, 8 or 16 bytes
//   cp_async_commit()                cp.async.commit_group
//   cp_async_wait<N>()               cp.async.wait_group N: all but the newest N
//                                    committed groups of this thread complete
//   cp_async_wait_all()              cp.async.wait_all
//
// mma and ldmatrix are warp-wide: all 32 lanes must execute them together.
// Emulated cp.async copies are queued per thread and happen only when a wait
// lets them, so reading the destination before waiting sees stale data.
#pragma once

#include <cstdint>

#if defined(GK_EMULATE)
#include <bit>
#include <cstring>
#include <source_location>

#include "emulate.h"
#endif

namespace gk {

#if defined(GK_EMULATE)

namespace ptx_detail {

using gk_emu::detail::fail;
using gk_emu::detail::strprintf;
using gk_emu::detail::where;

// mma and ldmatrix are .aligned: the whole warp executes them, none exited.
inline void require_full_warp(const char* name, const std::source_location& site) {
  const auto& t = gk_emu::detail::current_thread();
  if (const uint32_t present = t.worker->active_mask(t); present != ~0u)
    fail(strprintf("warp %u: %s at %s needs all 32 lanes of the warp, but only lanes 0x%08x are present", t.rank / 32,
                   name, where(site).c_str(), present));
}

// Element `half` (0 = low 16 bits) of a register holding two 16-bit values.
template <class Elem>
float unpack(uint32_t reg, int half) {
  return gk_emu::detail::to_float(std::bit_cast<Elem>(uint16_t(reg >> (16 * half))));
}

struct MmaArgs {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  float* d;
};

// m16n8k16 fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"): group g = lane / 4, t = lane % 4; element i of a
// fragment lives in register i / 2, low half first.
struct RowCol {
  int row, col;
};
constexpr RowCol a_element(int lane, int i) {
  return {lane / 4 + 8 * (i / 2 % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4)};
}
constexpr RowCol b_element(int lane, int i) { return {2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4}; }
constexpr RowCol cd_element(int lane, int i) { return {lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2}; }

// Gathers A, B and C from all lanes, computes D in f32 (the 16-bit products
// are exact) and scatters it. D may alias C: everything is gathered first.
template <class Elem>
void mma_run(MmaArgs* const (&lanes)[32], uint32_t) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaArgs& x = *lanes[lane];
    for (int i = 0; i < 8; ++i) a[a_element(lane, i).row][a_element(lane, i).col] = unpack<Elem>(x.a[i / 2], i % 2);
    for (int i = 0; i < 4; ++i) b[b_element(lane, i).row][b_element(lane, i).col] = unpack<Elem>(x.b[i / 2], i % 2);
    for (int i = 0; i < 4; ++i) c[cd_element(lane, i).row][cd_element(lane, i).col] = x.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const auto [m, n] = cd_element(lane, i);
      float acc = c[m][n];
      for (int k = 0; k < 16; ++k) acc += a[m][k] * b[k][n];
      lanes[lane]->d[i] = acc;
    }
  }
}

template <class Elem>
void mma(const char* name, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
         const std::source_location& site) {
  require_full_warp(name, site);
  MmaArgs args{a, b, c, d};
  gk_emu::detail::warp_collective(name, ~0u, args, &mma_run<Elem>, site);
}

struct LdmatrixArgs {
  const void* row;
  uint32_t* r;
  const char* name;
  std::source_location site;
};

template <int N, bool Trans>
void ldmatrix_run(LdmatrixArgs* const (&lanes)[32], uint32_t) {
  uint16_t m[N][8][8];
  for (int i = 0; i < N; ++i) {
    for (int row = 0; row < 8; ++row) {
      const LdmatrixArgs& x = *lanes[8 * i + row];
      if (reinterpret_cast<uintptr_t>(x.row) % 16 != 0)
        fail(strprintf("warp %u, lane %d: %s at %s: row address %p is not 16-byte aligned",
                       gk_emu::detail::current_thread().rank / 32, 8 * i + row, x.name, where(x.site).c_str(), x.row));
      std::memcpy(m[i][row], x.row, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, c = 2 * (lane % 4);
    for (int i = 0; i < N; ++i) {
      const uint16_t lo = Trans ? m[i][c][g] : m[i][g][c];
      const uint16_t hi = Trans ? m[i][c + 1][g] : m[i][g][c + 1];
      lanes[lane]->r[i] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

template <int N, bool Trans>
void ldmatrix(uint32_t (&r)[N], const void* smem_row, const std::source_location& site) {
  static_assert(N == 1 || N == 2 || N == 4);
  static constexpr const char* kName = N == 1 ? (Trans ? "ldmatrix.x1.trans" : "ldmatrix.x1")
                                       : N == 2 ? (Trans ? "ldmatrix.x2.trans" : "ldmatrix.x2")
                                                : (Trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  require_full_warp(kName, site);
  LdmatrixArgs args{smem_row, r, kName, site};
  gk_emu::detail::warp_collective(kName, ~0u, args, &ldmatrix_run<N, Trans>, site);
}

template <int Bytes>
void cp_async(const char* name, void* smem, const void* gmem, const std::source_location& site) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(smem) % Bytes != 0 || reinterpret_cast<uintptr_t>(gmem) % Bytes != 0)
    fail(strprintf("%s: %s at %s: addresses %p <- %p are not %d-byte aligned", gk_emu::detail::thread_name().c_str(),
                   name, where(site).c_str(), smem, gmem, Bytes));
  gk_emu::detail::current_thread().async_copies.add(smem, gmem, Bytes);
}

}  // namespace ptx_detail

inline void mma_m16n8k16_f16f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                                std::source_location site = std::source_location::current()) {
  ptx_detail::mma<__half>("mma.m16n8k16.f16", d, a, b, c, site);
}
inline void mma_m16n8k16_bf16f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                                 std::source_location site = std::source_location::current()) {
  ptx_detail::mma<__nv_bfloat16>("mma.m16n8k16.bf16", d, a, b, c, site);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<1, false>(r, smem_row, site);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<2, false>(r, smem_row, site);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<4, false>(r, smem_row, site);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<1, true>(r, smem_row, site);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<2, true>(r, smem_row, site);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  ptx_detail::ldmatrix<4, true>(r, smem_row, site);
}

inline void cp_async_16(void* smem, const void* gmem, std::source_location site = std::source_location::current()) {
  ptx_detail::cp_async<16>("cp.async.cg", smem, gmem, site);
}
template <int Bytes>
void cp_async_ca(void* smem, const void* gmem, std::source_location site = std::source_location::current()) {
  ptx_detail::cp_async<Bytes>("cp.async.ca", smem, gmem, site);
}
inline void cp_async_commit() { gk_emu::detail::current_thread().async_copies.commit(); }
template <int N>
void cp_async_wait() {
  static_assert(N >= 0);
  gk_emu::detail::current_thread().async_copies.wait(N);
}
inline void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

#else  // nvcc

namespace ptx_detail {
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
}  // namespace ptx_detail

// The two mma variants differ only in the element type named in the opcode.
#define GK_PTX_MMA_M16N8K16(ab)                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab ".f32 "                            \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"               \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]))

__device__ __forceinline__ void mma_m16n8k16_f16f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                    const float (&c)[4]) {
  GK_PTX_MMA_M16N8K16("f16");
}
__device__ __forceinline__ void mma_m16n8k16_bf16f32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
  GK_PTX_MMA_M16N8K16("bf16");
}
#undef GK_PTX_MMA_M16N8K16

#define GK_PTX_LDMATRIX(qualifiers, operands, ...) \
  asm volatile("ldmatrix.sync.aligned.m8n8." qualifiers ".shared.b16 " operands ";\n" : __VA_ARGS__)

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  GK_PTX_LDMATRIX("x1", "{%0}, [%1]", "=r"(r[0]) : "r"(ptx_detail::smem_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  GK_PTX_LDMATRIX("x2", "{%0, %1}, [%2]", "=r"(r[0]), "=r"(r[1]) : "r"(ptx_detail::smem_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  GK_PTX_LDMATRIX("x4", "{%0, %1, %2, %3}, [%4]", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                  : "r"(ptx_detail::smem_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
  GK_PTX_LDMATRIX("x1.trans", "{%0}, [%1]", "=r"(r[0]) : "r"(ptx_detail::smem_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  GK_PTX_LDMATRIX("x2.trans", "{%0, %1}, [%2]", "=r"(r[0]), "=r"(r[1]) : "r"(ptx_detail::smem_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  GK_PTX_LDMATRIX("x4.trans", "{%0, %1, %2, %3}, [%4]", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                  : "r"(ptx_detail::smem_address(smem_row)));
}
#undef GK_PTX_LDMATRIX

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(ptx_detail::smem_address(smem)),
               "l"(__cvta_generic_to_global(gmem))
               : "memory");
}
template <int Bytes>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(ptx_detail::smem_address(smem)),
               "l"(__cvta_generic_to_global(gmem)), "n"(Bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif  // GK_EMULATE

}  // namespace gk
