// The emulator runtime as kernel code sees it: the SIMD-group and threadgroup
// synchronisation points, threadgroup memory, and kernel registration. The
// implementation (fibers, guard pages, the launch loop) is in
// ../emulator_runtime.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// The only vector type the kernels use: the uint3 position attributes
// (complete here: clang checks the invoker below at its definition).
struct uint3 {
  unsigned int x, y, z;
};

namespace metal_emu {

float simd_sum(float v);
void threadgroup_barrier();

// Storage of the calling thread's next threadgroup array: every thread of a
// threadgroup declares the same arrays in the same order, so every thread
// gets the same address for the same declaration.
void* threadgroup_alloc(size_t bytes, size_t align);
template <typename T>
T* threadgroup_array(size_t count) {
  return static_cast<T*>(threadgroup_alloc(count * sizeof(T), alignof(T)));
}

// Positions of one thread, passed to a kernel's trailing parameters.
struct Position {
  uint32_t tg[3]; // threadgroup_position_in_grid
  uint32_t thread_in_tg; // thread_index_in_threadgroup
  uint32_t simd_group; // simdgroup_index_in_threadgroup
  uint32_t lane; // thread_index_in_simdgroup
};

using Invoker = void (*)(void (*fn)(), void* const* slots, const Position&);

void register_kernel(const char* name, void (*fn)(), Invoker invoker,
                     int buffer_params);

// Kernel parameters, by the convention of metal/README.md: the buffers in
// slot order (pointers, and the argument struct by reference), then exactly
// `uint3 threadgroup_position_in_grid, uint thread_index_in_threadgroup,
// uint simdgroup_index_in_threadgroup, uint thread_index_in_simdgroup`.
template <typename Arg>
Arg bind_slot(void* slot) {
  if constexpr (std::is_pointer_v<Arg>) {
    return static_cast<Arg>(slot);
  } else {
    static_assert(std::is_reference_v<Arg>,
                  "kernel buffer parameters are pointers or references");
    return *static_cast<std::remove_reference_t<Arg>*>(slot);
  }
}

template <typename... P>
struct KernelSignature {
  static constexpr int kPositionParams = 4;
  static constexpr int kBufferParams = int(sizeof...(P)) - kPositionParams;
  using Params = std::tuple<P...>;
  static_assert(kBufferParams >= 1, "a kernel takes buffers, then positions");
  static_assert(
      std::is_same_v<std::tuple_element_t<kBufferParams, Params>, uint3> &&
          std::is_same_v<std::tuple_element_t<kBufferParams + 1, Params>,
                         unsigned int> &&
          std::is_same_v<std::tuple_element_t<kBufferParams + 2, Params>,
                         unsigned int> &&
          std::is_same_v<std::tuple_element_t<kBufferParams + 3, Params>,
                         unsigned int>,
      "kernels end with (uint3 threadgroup_position_in_grid, uint "
      "thread_index_in_threadgroup, uint simdgroup_index_in_threadgroup, uint "
      "thread_index_in_simdgroup)");

  template <size_t... I>
  static void call(void (*fn)(P...), void* const* slots, const Position& pos,
                   std::index_sequence<I...>) {
    fn(bind_slot<std::tuple_element_t<I, Params>>(slots[I])...,
       uint3{pos.tg[0], pos.tg[1], pos.tg[2]}, pos.thread_in_tg,
       pos.simd_group, pos.lane);
  }

  static void invoke(void (*fn)(), void* const* slots, const Position& pos) {
    call(reinterpret_cast<void (*)(P...)>(fn), slots, pos,
         std::make_index_sequence<size_t(kBufferParams)>());
  }
};

struct KernelRegistration {
  template <typename... P>
  KernelRegistration(const char* name, void (*fn)(P...)) {
    register_kernel(name, reinterpret_cast<void (*)()>(fn),
                    &KernelSignature<P...>::invoke,
                    KernelSignature<P...>::kBufferParams);
  }
};

} // namespace metal_emu
