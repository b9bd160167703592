// The supported grid of the fused MoE ops: the one place it is written.
// Python reads it through fused_moe._ext (SUPPORTED_BITS, ...), the table
// in docs/api.md mirrors it, and every kernel backend instantiates exactly
// this set.
#pragma once

#include <array>

namespace fused_moe {

inline constexpr std::array<int, 2> kSupportedBits = {3, 4};
inline constexpr std::array<int, 3> kSupportedGroupSizes = {32, 64, 128};
inline constexpr int kMinTopK = 1;
inline constexpr int kMaxTopK = 16;
// A quantized router gate (fused_moe.route): the bits accepted, at any of
// kSupportedGroupSizes. mlx-lm quantizes the gate at 8 bits by default.
inline constexpr std::array<int, 1> kSupportedRouterBits = {8};
// fused_moe.quantized_matmul and quantized_embedding (one dense affine
// matrix): the bits mx.quantize offers, at any of kSupportedGroupSizes.
inline constexpr std::array<int, 6> kSupportedLinearBits = {2, 3, 4, 5, 6, 8};

} // namespace fused_moe
