// Test support, never part of the extension: run the csrc/ kernels on the CPU.
//
// tests/test_cuda_backend.py compiles host copies of the .cu files and of bindings.cpp with the
// host compiler, this header force-included (-include), after rewriting each
// `kernel<<<grid, block, smem, stream>>>(args)` into `edora_emulation::launch(kernel, grid, block,
// args)`. A launch runs its blocks one after another; a block's threads run as fibers
// (ucontext) on one OS thread, each until it reaches a barrier or a warp primitive, so that
//  - __syncthreads releases when every thread of the block waits at one, __syncwarp when the
//    32 lanes of a warp do (a warp is 32 consecutive linear thread indices, as on the GPU);
//  - __shfl_xor_sync, __ballot_sync and __syncthreads_count exchange values through those
//    barriers; a barrier some threads never reach aborts with "deadlock";
//  - __shared__ variables are static storage, shared by the block's threads.
// What it proves: the kernels' index arithmetic, tiling, masking, barriers (a read of shared
// memory before the barrier that publishes it reads what the scheduling order left there) and
// reduction orders. What it cannot: concurrency between blocks, the GPU memory model, nvcc's code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

// The CUDA qualifiers as plain C++ (host_defines.h gives them GPU attributes).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define cudaGetLastError() (cudaSuccess)
#define cudaGetErrorString(err) ("a launch under CPU emulation failed")

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace edora_emulation {

enum class State { kRun, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kRun;
  dim3 index;
  std::vector<char> stack;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  std::function<void()> body;
  std::vector<double> values;     // __shfl_xor_sync
  std::vector<int64_t> booleans;  // __ballot_sync, __syncthreads_count
};

inline Block* block = nullptr;
constexpr size_t kStackBytes = 1 << 16;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cpu_emulation: %s (block %u, %u, %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z);
  std::abort();
}

inline void wait(State state) {
  Fiber& fiber = block->fibers[block->current];
  fiber.state = state;
  swapcontext(&fiber.context, &block->scheduler);
}

inline void fiber_main() {
  block->body();
  block->fibers[block->current].state = State::kDone;  // returns to the scheduler (uc_link)
}

inline void run_block(const std::function<void()>& body) {
  static Block b;
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  b.fibers.resize(n);
  b.body = body;
  b.values.assign(n, 0.0);
  b.booleans.assign(n, 0);
  block = &b;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.stack.resize(kStackBytes);
    f.state = State::kRun;
    f.index = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (;;) {
    // Every runnable thread runs to its next barrier (or its end), in index order.
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].state != State::kRun) continue;
      b.current = i;
      threadIdx = b.fibers[i].index;
      swapcontext(&b.scheduler, &b.fibers[i].context);
    }
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
      bool all = true;
      for (int l = 0; l < lanes; ++l) all &= b.fibers[w * 32 + l].state == State::kWarpBarrier;
      if (!all) continue;
      for (int l = 0; l < lanes; ++l) b.fibers[w * 32 + l].state = State::kRun;
      released = true;
    }
    if (released) continue;
    int waiting = 0, done = 0;
    for (const Fiber& f : b.fibers) {
      waiting += f.state == State::kBlockBarrier;
      done += f.state == State::kDone;
    }
    if (done == n) return;
    if (waiting == n) {
      for (Fiber& f : b.fibers) f.state = State::kRun;
      continue;
    }
    if (waiting + done == n) fail("__syncthreads after some threads of the block returned");
    fail("deadlock: a barrier that not every thread (or lane) reaches");
  }
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("a launch with an empty grid");
  if (threads.x * threads.y * threads.z > 1024) fail("more than 1024 threads per block");
  gridDim = grid;
  blockDim = threads;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block([&] { kernel(args...); });
      }
    }
  }
}

// The binding's device guard.
struct Guard {
  template <typename Device>
  explicit Guard(const Device&) {}
};

}  // namespace edora_emulation

inline void __syncthreads() { edora_emulation::wait(edora_emulation::State::kBlockBarrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  edora_emulation::wait(edora_emulation::State::kWarpBarrier);
}

inline int __syncthreads_count(int predicate) {
  auto& b = *edora_emulation::block;
  b.booleans[b.current] = predicate != 0;
  __syncthreads();
  int count = 0;
  for (int64_t v : b.booleans) count += static_cast<int>(v);
  __syncthreads();
  return count;
}

template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  auto& b = *edora_emulation::block;
  const int me = b.current;
  b.values[me] = static_cast<double>(value);  // exact for float and double
  __syncwarp();
  const int lane = me % 32;
  const V result = static_cast<V>(b.values[me - lane + (lane ^ lane_mask)]);
  __syncwarp();
  return result;
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  auto& b = *edora_emulation::block;
  const int me = b.current;
  b.booleans[me] = predicate != 0;
  __syncwarp();
  unsigned bits = 0;
  const int first = me - me % 32;
  for (int l = 0; l < 32; ++l) {
    if (b.booleans[first + l]) bits |= 1u << l;
  }
  __syncwarp();
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
