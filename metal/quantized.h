// Per-lane pieces shared by both kernels: loading 16 packed codes, loading
// 16 activations pre-scaled for the masked dot product, and that product.
//
// The masked dot product (the idea of MLX's qdot, our own code): instead of
// shifting each code down, multiply the code still in place, `word & (m <<
// b*c)` = q_c * 2^(b*c), by x_c pre-scaled with 2^-(b*c). Every product is
// exact in fp32 (a code has at most 4 significant bits), so the result is
// sum q_c*x_c with no shifts in the inner loop. The affine part is applied once
// per lane and row: scale*sum q*x + bias*sum x.
#pragma once

#include "tile_shapes.h"

namespace fused_moe_kernels {

using namespace fused_moe_tiles;

// A lane's 16 codes as two 8-code words: code c of a word at bit BITS*c.
struct LaneCodes {
  uint32_t lo; // codes 0-7
  uint32_t hi; // codes 8-15
};

// Codes [first_code, first_code + 16) of one packed row. first_code is a
// multiple of 16, so the 4-bit read is two aligned words and the 3-bit read
// (6 bytes) three aligned half-words.
template <int BITS>
inline LaneCodes load_lane_codes(device const uint8_t* row, uint first_code) {
  LaneCodes codes;
  if (BITS == 4) {
    device const uint32_t* p = (device const uint32_t*)(row + first_code / 2);
    codes.lo = p[0];
    codes.hi = p[1];
  } else {
    device const uint16_t* p =
        (device const uint16_t*)(row + first_code * 3 / 8);
    const uint32_t a = p[0], b = p[1], c = p[2];
    codes.lo = a | ((b & 0xffu) << 16); // bytes 0-2
    codes.hi = (b >> 8) | (c << 8); // bytes 3-5
  }
  return codes;
}

// Loads 16 activations into `scaled` pre-multiplied by 2^-(BITS*(c mod 8))
// and returns their plain sum (for the bias term).
template <int BITS, typename T>
inline float load_prescaled(device const T* x, thread float* scaled) {
  float sum = 0.0f;
  for (int c = 0; c < kCodesPerLane; ++c) {
    const float v = float(x[c]);
    sum += v;
    scaled[c] = v / float(1u << (BITS * (c % 8)));
  }
  return sum;
}

// sum_c q_c * x_c for the 16 codes, from pre-scaled activations.
template <int BITS>
inline float masked_dot(thread const float* scaled, LaneCodes codes) {
  const uint32_t mask = (1u << BITS) - 1u;
  float acc = 0.0f;
  for (int c = 0; c < 8; ++c) {
    acc += scaled[c] * float(codes.lo & (mask << (BITS * c)));
  }
  for (int c = 0; c < 8; ++c) {
    acc += scaled[8 + c] * float(codes.hi & (mask << (BITS * c)));
  }
  return acc;
}

// One quantized row as one lane sees it at one step: codes, scale and bias.
template <typename T, int BITS, int GROUP>
struct LaneRow {
  LaneCodes codes;
  float scale;
  float bias;

  // `row` is the packed row's first byte; `row_index` its index among all
  // rows of the stacked matrix (for scales and biases).
  void load(
      device const uint8_t* row,
      device const T* scales,
      device const T* biases,
      size_t row_index,
      uint groups_per_row,
      uint first_code) thread {
    codes = load_lane_codes<BITS>(row, first_code);
    const size_t g = row_index * groups_per_row + first_code / GROUP;
    scale = float(scales[g]);
    bias = float(biases[g]);
  }

  // This lane's share of row * x: scale*sum q*x + bias*sum x.
  float dot(thread const float* scaled_x, float x_sum) const thread {
    return scale * masked_dot<BITS>(scaled_x, codes) + bias * x_sum;
  }
};

} // namespace fused_moe_kernels
