// The Metal kernels' source, embedded in the extension at build time
// (csrc/metal/embed_source.py) and compiled at run time, one kernel per
// library, on first use (eval_gpu.cpp). Plain C++, built on every platform,
// so Linux builds carry the same string and the emulator compiles it.
#pragma once

#include <string>

namespace fused_moe::metal {

// The whole translation unit: metal/fused_moe.metal with the headers it
// includes inlined, instantiating every kernel of the allow-list.
const std::string& metal_source();

// The source one kernel is compiled from: the same text with only that
// kernel's instantiation, spelled from the allow-list of allow_list.h.
// Throws std::invalid_argument naming the kernel and the instantiated set
// when `kernel` is not in the allow-list.
std::string kernel_source(const std::string& kernel);

// The name MLX caches the kernel's library under, for the life of the
// process: "fused_moe_<version>_<kernel>", so that two versions of the
// package loaded into one process never share a library.
std::string library_name(const std::string& kernel);

} // namespace fused_moe::metal
