// The gate/up epilogues: act(g, u) for the gated activations, act(a) for the
// others, in fp32, exactly the formulas of docs/kernel_contract.md (mlx-lm's
// model files are the spec). The activation is a template argument of the
// gate/up kernels (its id from allow_list.h); its float parameters come from
// the argument struct.
//
// Clamps keep a NaN: `l < z ? l : z` is z when z is NaN, as MLX's minimum
// and clip propagate it (a NaN in one token stays in that token's rows).
// exp and tanh are the precise ones: the fast exp costs greedy-decoding
// parity (DESIGN.md).
#pragma once

#include "allow_list.h"
#include "args.h"
#include "tile_shapes.h"

namespace fused_moe_kernels {

using fused_moe_args::FusedMoeArgs;

// kActivation_<name>: the ids of allow_list.h, which are supported.h's.
#define FM_ACTIVATION_CONSTANT_(name, id, gated, ...) \
  FM_TILE_CONSTANT int kActivation_##name = id;
FM_FOR_EACH_ACTIVATION(FM_ACTIVATION_CONSTANT_, )
#undef FM_ACTIVATION_CONSTANT_

// Whether activation `act` takes gate and up rows (2H packed rows) or fc1
// rows (H).
#define FM_ACTIVATION_GATED_(name, id, gated, act) (act) == (id) ? (gated) != 0 :
constexpr bool activation_gated(int act) {
  return FM_FOR_EACH_ACTIVATION(FM_ACTIVATION_GATED_, act) false;
}
#undef FM_ACTIVATION_GATED_

inline float sigmoid(float z) {
  return 1.0f / (1.0f + metal::precise::exp(-z));
}

// min(z, l) and max(z, l) that keep a NaN z.
inline float clamp_above(float z, float l) {
  return l < z ? l : z;
}
inline float clamp_below(float z, float l) {
  return z < l ? l : z;
}
// clip(z, +-l)
inline float clip(float z, float l) {
  return clamp_below(clamp_above(z, l), -l);
}

// 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))): MLX's gelu_approx.
inline float gelu_approx(float z) {
  return 0.5f * z *
      (1.0f + metal::precise::tanh(0.7978845608028654f * (z + 0.044715f * z * z * z)));
}

// h = act(g, u) (gated) or act(g) (not gated: u unused), in fp32.
template <int ACT>
inline float activate(float g, float u, constant FusedMoeArgs& args) {
  if (ACT == kActivation_swiglu) {
    // silu(g) * u
    return g / (1.0f + metal::precise::exp(-g)) * u;
  }
  if (ACT == kActivation_clamped_swiglu) {
    return clamp_above(g * sigmoid(g), args.limit) * clip(u, args.limit);
  }
  if (ACT == kActivation_deepseek_v41_swiglu) {
    // The op function made limit <= 0 plain swiglu (supported.h).
    const float gc = clamp_above(g, args.limit);
    return gc * sigmoid(gc) * clip(u, args.limit);
  }
  if (ACT == kActivation_swiglu_oai) {
    const float gc = clamp_above(g, args.limit);
    return (clip(u, args.limit) + 1.0f) * (gc * sigmoid(args.alpha * gc));
  }
  if (ACT == kActivation_geglu) {
    return gelu_approx(g) * u;
  }
  if (ACT == kActivation_situ) {
    const float a = args.beta * metal::precise::tanh(g / args.beta) * sigmoid(g);
    const float b = args.linear_beta != 0.0f
        ? args.linear_beta * metal::precise::tanh(u / args.linear_beta)
        : u;
    return a * b;
  }
  if (ACT == kActivation_gelu_approx) {
    return gelu_approx(g);
  }
  // relu2: max(a, 0)^2
  const float r = clamp_below(g, 0.0f);
  return r * r;
}

} // namespace fused_moe_kernels
