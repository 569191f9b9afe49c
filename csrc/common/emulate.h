// CPU emulator for CUDA kernels: compiles our .cu files with the host
// compiler and runs them with CUDA semantics, so CI without a GPU executes
// every kernel and catches synchronisation bugs.
//
// Compiling a kernel file for emulation (C++20, header only):
//
//   g++ -std=c++20 -x c++ -DGK_EMULATE -include csrc/common/emulate.h
//       -I/usr/local/cuda/include -fstack-clash-protection -pthread kernel.cu
//
// (-fstack-clash-protection makes large stack frames touch every page, so
// they hit the guard page below a fiber stack instead of jumping over it.)
//
// launch.h and ptx.h include this header themselves when GK_EMULATE is
// defined; the forced include is for files that use CUDA keywords before
// including either. Kernels are launched with gk::launch (launch.h).
//
// Model:
//  * Every GPU thread is a fiber with its own stack (mmap'd, guard region
//    below; GK_EMU_STACK_KB or gk_emu::set_stack_size, default 256 KiB).
//  * Blocks run one after another; GK_EMU_THREADS or set_num_threads(n)
//    spread whole blocks over n OS threads. Static __shared__ variables are
//    thread_local, atomics are real atomics.
//  * Within a block, threads run one at a time up to their next __syncthreads
//    or warp collective, in forward, reverse or seeded random order
//    (GK_EMU_ORDER=forward|reverse|random[:seed], read at first use, or
//    set_thread_order; the random order is redrawn at every barrier, and
//    blocks run in the same kind of order).
//  * __syncthreads faults on divergence (threads waiting at different call
//    sites), on threads that exited while others wait, and on deadlock.
//    Warp collectives wait for the lanes of their mask; a shuffle reading a
//    lane outside its mask, lanes meeting at collectives of another kind or
//    mask, and lanes that exit while named in a mask all fault. Lanes past
//    the end of a block's last warp do not exist and drop out of masks.
//  * Faults throw gk_emu::EmulationError from the launch, naming the kernel,
//    block, threads and source lines; the block's fibers are abandoned.
//  * Dynamic shared memory (GK_DYNAMIC_SMEM) is filled with 0xFF bytes at the
//    start of every block, so reads before writes show up as NaN; more than
//    48 KiB needs cudaFuncAttributeMaxDynamicSharedMemorySize, as on a GPU.
//
// API (namespace gk_emu): launch(kernel, grid, block, smem, args...) (use
// gk::launch from launch.h in kernels' host code), set_thread_order(Order,
// seed), set_stack_size(bytes), set_num_threads(n), EmulationError.
//
// Limitations: static __shared__ memory is not poisoned and keeps its values
// across blocks; write `alignas(n) __shared__ T x` or `__shared__
// __align__(n) T x` (g++ rejects `__shared__ alignas(n)`); __activemask()
// reports all lanes that have not exited, as fibers have no convergence; the
// fast-math intrinsics (__expf, ...) return accurate results; no cooperative
// groups, dynamic parallelism, textures, or copies to __constant__ symbols;
// emulation builds need C++ exceptions.
#pragma once

#if !defined(GK_EMULATE)
#error "emulate.h is for emulation builds only: define GK_EMULATE"
#endif
#if defined(__CUDACC__)
#error "emulate.h is compiled by the host compiler, not nvcc"
#endif

// Keywords, before the CUDA headers so that theirs keep these definitions.
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __launch_bounds__(...)

// This header stands in for the runtime headers; a kernel file that includes
// them anyway gets nothing more from them.
#define __CUDA_RUNTIME_H__
#define __CUDA_RUNTIME_API_H__
#define __DEVICE_LAUNCH_PARAMETERS_H__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include "emulate_device.h"
#include "emulate_runtime_api.h"
#include "emulate_scheduler.h"
