// The supported grid of the fused MoE ops: the one place it is written.
// Python reads it through fused_moe._ext (SUPPORTED_BITS, SUPPORTED_MODES,
// SUPPORTED_ACTIVATIONS, supported_quantizations(), ...), the table in
// docs/api.md mirrors it, and every kernel backend instantiates exactly this set.
// docs/kernel_contract.md gives the math of every setting.
#pragma once

#include <array>
#include <string_view>

namespace fused_moe {

// ---------------------------------------------------------------------------
// Quantization of one expert projection
// ---------------------------------------------------------------------------

// How a projection's codes become weights, named as MLX names its modes.
//   affine: w = scale·q + bias per group, scale and bias in the activations'
//           dtype, q an unsigned `bits`-bit code.
//   mxfp4:  w = e2m1(q)·2^(s-127), s an e8m0 uint8 per group of 32.
//   mxfp8:  w = e4m3(q)·2^(s-127), s an e8m0 uint8 per group of 32.
//   nvfp4:  w = e2m1(q)·e4m3(s)[·global_scale/2688], s per group of 16.
enum class QuantMode : int { affine = 0, mxfp4 = 1, mxfp8 = 2, nvfp4 = 3 };

// The affine bits of the expert ops, the dense linears and the embedding:
// every width mx.quantize offers but 1.
inline constexpr std::array<int, 6> kSupportedBits = {2, 3, 4, 5, 6, 8};
// The affine group sizes (every op).
inline constexpr std::array<int, 3> kSupportedGroupSizes = {32, 64, 128};

// A floating-point mode exactly as MLX 0.32.4 stores it: codes packed like
// affine codes of `bits` bits, one uint8 scale per group of `group_size`,
// no biases. MLX accepts no other bits or group size for these modes.
struct FpModeSpec {
  QuantMode mode;
  const char* name;
  int bits;
  int group_size;
  const char* code_format; // of each weight
  const char* scale_format; // of each group's uint8 scale
  bool global_scale; // an optional float32 per-tensor scale (per expert)
};
inline constexpr std::array<FpModeSpec, 3> kFpModes = {{
    {QuantMode::mxfp4, "mxfp4", 4, 32, "e2m1", "e8m0", false},
    {QuantMode::mxfp8, "mxfp8", 8, 32, "e4m3", "e8m0", false},
    {QuantMode::nvfp4, "nvfp4", 4, 16, "e2m1", "e4m3", true},
}};

// The spec of an fp mode (not affine).
constexpr const FpModeSpec& fp_mode_spec(QuantMode m) {
  return kFpModes[static_cast<int>(m) - 1];
}
static_assert(
    kFpModes[0].mode == QuantMode::mxfp4 && kFpModes[1].mode == QuantMode::mxfp8 &&
    kFpModes[2].mode == QuantMode::nvfp4);

// Every mode, in QuantMode order.
inline constexpr std::array<const char*, 4> kModeNames = {
    "affine", "mxfp4", "mxfp8", "nvfp4"};

constexpr const char* mode_name(QuantMode m) {
  return kModeNames[static_cast<int>(m)];
}

// ---------------------------------------------------------------------------
// Activation of the gate/up op
// ---------------------------------------------------------------------------

// The activation applied in the gate/up kernels' epilogue, in fp32, with g
// the gate row's and u the up row's result (after the expert bias). Each
// is a compile-time parameter of the kernels; its float parameters (limit,
// alpha, beta, linear_beta) are run-time arguments. mlx-lm's model files are
// the spec (docs/kernel_contract.md):
//   swiglu               silu(g)·u                        most models
//   clamped_swiglu       min(silu(g), limit)·clip(u, ±limit)   step3p5
//   deepseek_v41_swiglu  silu(min(g, limit))·clip(u, ±limit);
//                        plain swiglu when limit <= 0     deepseek_v41
//   swiglu_oai           g' = min(g, limit), u' = clip(u, ±limit),
//                        (u' + 1)·g'·sigmoid(alpha·g')    gpt_oss, minimax_m3_vl
//   geglu                gelu_approx(g)·u (tanh form)     gemma4
//   situ                 beta·tanh(g/beta)·sigmoid(g) ·
//                        (linear_beta·tanh(u/linear_beta), or u)   kimi_k3
// Not gated (SwitchMLP: fc1, activation, fc2; the weight has H rows of fc1,
// no up rows):
//   gelu_approx          0.5·a·(1 + tanh(√(2/π)·(a + 0.044715·a³)))  phixtral
//                        (SwitchMLP's default nn.GELU(approx="precise"))
//   relu2                max(a, 0)²                       nemotron_h
enum class Activation : int {
  swiglu = 0,
  clamped_swiglu,
  deepseek_v41_swiglu,
  swiglu_oai,
  geglu,
  situ,
  gelu_approx,
  relu2,
};

struct ActivationSpec {
  Activation kind;
  const char* name;
  bool gated; // gate and up rows (2H) or fc1 rows (H)
  // The float parameters it takes: required unless marked optional.
  bool limit, alpha, beta, linear_beta_optional;
};
inline constexpr std::array<ActivationSpec, 8> kActivations = {{
    {Activation::swiglu, "swiglu", true, false, false, false, false},
    {Activation::clamped_swiglu, "clamped_swiglu", true, true, false, false, false},
    {Activation::deepseek_v41_swiglu, "deepseek_v41_swiglu", true, true, false, false, false},
    {Activation::swiglu_oai, "swiglu_oai", true, true, true, false, false},
    {Activation::geglu, "geglu", true, false, false, false, false},
    {Activation::situ, "situ", true, false, false, true, true},
    {Activation::gelu_approx, "gelu_approx", false, false, false, false, false},
    {Activation::relu2, "relu2", false, false, false, false, false},
}};

constexpr const ActivationSpec& activation_spec(Activation a) {
  return kActivations[static_cast<int>(a)];
}
static_assert(kActivations[7].kind == Activation::relu2);

// ---------------------------------------------------------------------------
// Other ops
// ---------------------------------------------------------------------------

inline constexpr int kMinTopK = 1;
inline constexpr int kMaxTopK = 16;
// A quantized router gate (fused_moe.route): the bits accepted, at any of
// kSupportedGroupSizes. mlx-lm quantizes the gate at 8 bits by default.
inline constexpr std::array<int, 1> kSupportedRouterBits = {8};
// fused_moe.quantized_matmul and quantized_embedding (one dense affine
// matrix): the same affine bits as the experts.
inline constexpr std::array<int, 6> kSupportedLinearBits = kSupportedBits;

} // namespace fused_moe
