// Interface between each op's CPU evaluation (cpu/<op>.cpp)
// and the per-ISA kernel bodies (kernels_impl.h, compiled once per
// instruction set).
#pragma once

#include <cstdint>

#include "supported.h"

namespace fused_moe::cpu {

enum class FloatType { f32, f16, bf16 };

// One stacked quantized matrix [E, rows, cols] in MLX's packing, in any mode
// of the grid (docs/kernel_contract.md).
struct QuantMatrix {
  const uint8_t* weight; // [E, rows, cols*bits/8] bytes
  const void* scales; // [E, rows, cols/group_size]: affine `scale_type`,
                      // the fp modes uint8 (e8m0 or e4m3)
  const void* biases; // affine: as scales; the fp modes: null
  FloatType scale_type;
  int rows;
  int cols;
  int bits;
  int group_size;
  QuantMode mode = QuantMode::affine;
  // nvfp4's float32 tensor scales [E, global_scale_period], or null: row r
  // of expert e takes global_scale[e * period + r % period] (gate/up rows
  // alternate, so a gated gate/up matrix has period 2).
  const float* global_scale = nullptr;
  int global_scale_period = 1;
};

// The activation of kernel A and its run-time parameters (supported.h).
struct ActivationArgs {
  Activation kind = Activation::swiglu;
  float limit = 0.0f;
  float alpha = 0.0f;
  float beta = 0.0f;
  float linear_beta = 0.0f; // 0: none
};

// (token, slot) pairs grouped by expert. Pair p = t*k + j. Experts appear in
// increasing id order, so every reduction order is fixed before threading.
struct ExpertGroups {
  const int32_t* experts; // [n_used] expert ids, increasing
  const int32_t* offsets; // [n_used + 1] into `pairs`
  const int32_t* pairs; // [T*k] pair ids, grouped by expert
  int n_used;
  int k;
};

// Activation rows quantized for integer dot products (AVX-512 build only):
// per group of `group_size` values, x ≈ scale·(128·hi + lo), with the planes
// laid out in the order the kernel unpacks `bits`-bit codes.
struct QuantizedActs {
  int8_t* hi; // [rows, cols]
  int8_t* lo; // [rows, cols]
  float* scale; // [rows, cols/group_size]
  float* sum; // [rows, cols/group_size] exact Σx of each group
  int cols;
  int group_size;
  int bits;
};

// Activation rows quantized to int16 for the int16 integer path (AVX2, and
// on AVX-512 for what VNNI does not take): per group of `group_size` values,
// x ≈ scale·q.
struct Int16Acts {
  int16_t* q; // [rows, cols]
  float* scale; // [rows, cols/group_size]
  float* sum; // [rows, cols/group_size] exact Σx of each group
  int cols;
  int group_size;
  // 4-bit codes: each block of 32 activations is stored as its 16 even
  // ones, then its 16 odd ones, the order in which the low and high
  // nibbles of the block's 16 bytes come out.
  bool split4 = false;
};

// Kernel A: h[p, r] = act(gate, up) of packed rows 2r and 2r+1 (gated), or
// act(row r) (not gated), each row's dot product plus its expert bias.
struct GateUpArgs {
  QuantMatrix w; // rows = 2H (gated) or H, cols = D
  ExpertGroups groups;
  const float* x; // [T, D] (or [T*k, D] per slot) fp32 activations
  const QuantizedActs* xq; // the same, quantized; null for the float path
  const Int16Acts* x16; // the same as int16, or null
  void* h; // [T*k, H] output
  FloatType h_type;
  ActivationArgs act;
  bool gated;
  bool x_per_slot; // x row of pair p: p (per slot) or p / k (shared)
  const void* bias; // [E, rows] expert bias of `bias_type`, or null
  FloatType bias_type;
};

// Kernel B: o[p, d] = h[p] · D_e[d] + bias[e, d]; with the combine
// y[t, d] = Σ over pairs of token t of weight[p] · o[p, d], else y[p, d] =
// o[p, d].
struct DownArgs {
  QuantMatrix w; // rows = D, cols = H
  ExpertGroups groups;
  const float* h; // [T*k, H] fp32 copy of h
  const QuantizedActs* hq; // the same, quantized; null for the float path
  const Int16Acts* h16; // the same as int16, or null
  const float* pair_weights; // [T*k] fp32 router weights; null: per slot
  float* y_acc; // [T, D] fp32 accumulator, owned per row range (combine)
  void* y; // [T, D] (combine) or [T*k, D] output
  FloatType y_type;
  int T;
  const void* bias; // [E, D] expert bias of `bias_type`, or null
  FloatType bias_type;
};


// One dense linear: y[t, n] = x[t] · W[n] with W an affine-quantized [N, K]
// matrix (`w` with E = 1: rows = N, cols = K).
struct LinearArgs {
  QuantMatrix w;
  const float* x; // [T, K] fp32 activations
  const QuantizedActs* xq; // quantized for the AVX-512 integer tiles, or null
  const Int16Acts* x16; // quantized for the AVX2 8-bit path, or null
  void* y; // [T, N] output
  FloatType y_type;
};

// Rows of an affine-quantized [N, K] matrix, dequantized: the embedding.
struct GatherArgs {
  QuantMatrix w; // rows = N, cols = K
  const int64_t* ids; // [T] row ids, each checked in [0, N)
  void* out; // [T, K]
  FloatType out_type;
};

// Scaled dot-product attention over a KV cache (grouped-query heads):
// out[b, h, l] = softmax(q[b, h, l] · K[b, h/G]ᵀ · scale) · V[b, h/G], with
// query row l seeing keys [0, S - L + l] when causal and all S otherwise.
// q and out are row-contiguous [B, Hq, L, Dh].

// One of K or V, [B, Hkv, S, Dh], as element strides into its buffers (a
// cache buffer's slice, read in place). A float cache: `data` holds the
// values. A quantized cache (mlx-lm's QuantizedKVCache, MLX's affine
// format): `data` holds the codes as uint32 words [B, Hkv, S, Dh·bits/32],
// `scales` and `biases` [B, Hkv, S, Dh/group_size], value = scale·code + bias.
struct CacheTensor {
  const void* data;
  const void* scales; // quantized only
  const void* biases; // quantized only
  int64_t stride[4]; // of data, in its elements (values or words)
  int64_t scale_stride[4]; // quantized only
  int64_t bias_stride[4]; // quantized only
};

struct AttentionArgs {
  const void* q;
  void* out;
  FloatType type; // of q and out
  CacheTensor k, v;
  int bits; // 0: a float cache of `cache_type`; 4 or 8: quantized
  int group_size; // quantized only
  FloatType cache_type; // of a float cache's values, or of the scales/biases
  int B, Hq, Hkv, L, S, Dh;
  float scale;
  bool causal;
};

// Groups of a quantized cache row at most: head_dim <= 512, group size >= 32
// (ops/attention.h checks both).
constexpr int kMaxAttentionGroups = 16;

// The query heads of one GQA group a task takes at once; a group of more
// heads is split into tasks of this many.
constexpr int kAttentionHeads = 8;
// Query rows a task takes at once (long prompts): each block of keys,
// converted to fp32 once, serves every row of the tile.
constexpr int kAttentionRows = 8;
// Keys per chunk: one partial softmax (max, sum, weighted values). Chunks
// start at key 0 whatever the thread count, and every result folds the
// chunks' partials in chunk order, in the task or in a merge.
constexpr int kAttentionKeyChunk = 512;

// One attention task: batch b, KV head g, query heads [h0, h1) of its group
// (at most kAttentionHeads), query rows [l0, l1) (at most kAttentionRows),
// key chunks [c0, c1). With `partial` null the task folds its chunks and
// writes the output; otherwise it takes one chunk (c1 = c0 + 1) and writes
// that chunk's partial there, attention_partial_floats() floats.
struct AttentionTask {
  int b, g, h0, h1, l0, l1, c0, c1;
  float* partial;
};

// Floats of one task's partial: per (row, head), max, sum and Dh values.
constexpr int64_t attention_partial_floats(int rows, int heads, int Dh) {
  return static_cast<int64_t>(rows) * heads * (Dh + 2);
}

// The attention's q or k RMSNorm and rotary embedding, heads split out:
// out[b, h, l, :] = rope(rmsnorm(x[b, l, :]) [h·Dh, (h+1)·Dh)), position l.
struct NormRopeArgs {
  const void* x; // [B, L, H*Dh] row-contiguous
  const void* weight; // [H*Dh] norm weight of `weight_type`; null: no norm
  FloatType weight_type;
  void* out; // [B, H, L, Dh]
  FloatType type; // of x and out
  const float* cos_sin; // [L, rotary_dim/2, 2] cos, sin of each angle
  int B, L, H, Dh, rotary_dim;
  float eps;
  bool traditional; // rotate pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
};

// The settings the AVX-512 VNNI path has code unpacking for (affine 3, 4
// and 8 bits); the others take the int16 path or the fp32 path.
constexpr bool vnni_path(QuantMode mode, int bits) {
  return mode == QuantMode::affine && (bits == 3 || bits == 4 || bits == 8);
}

// The settings the int16 path takes: every affine width, and the fp4 modes,
// whose e2m1 values times 2 are the integers -12..12 (the ½ goes into the
// group's fp32 scale). mxfp8's e4m3 values are not small integers: fp32.
constexpr bool int16_path(QuantMode mode, int bits) {
  (void)bits;
  return mode != QuantMode::mxfp8;
}

// The router's gate [E, D], either in a float dtype or as 8-bit affine codes
// (w = scale·q + bias per group of `group_size` inputs).
struct RouterGate {
  const void* weight; // [E, D] of `weight_type`, or [E, D] uint8 codes
  const void* scales; // [E, D/group_size] of `scale_type`; null if unquantized
  const void* biases; // same shape and type as scales
  FloatType weight_type; // unquantized only
  FloatType scale_type; // quantized only
  bool quantized;
  int group_size; // quantized only
  int E;
  int D;
};

// Router logits: logits[t, e] = x[t] · W[e], summed in fp32.
struct RouteArgs {
  RouterGate gate;
  const float* x; // [T, D] fp32 activations
  float* logits; // [T, E] output
};

// The kernels one instruction-set build provides. Each call covers a disjoint
// slice of the output, so any number of threads gives identical bits.
struct KernelTable {
  const char* isa_name;
  // h rows [r_begin, r_end) of every pair routed to expert slot `u`.
  void (*gate_up_rows)(const GateUpArgs&, int u, int r_begin, int r_end);
  // y rows [d_begin, d_end) of every token, summed over all experts.
  void (*down_rows)(const DownArgs&, int d_begin, int d_end);
  // Fills row `row` of `q` from x [rows, q.cols]. Null where this build has
  // no integer path; the kernels then take fp32 activations only.
  void (*quantize_acts)(const float* x, int64_t row, const QuantizedActs& q);
  // logits of experts [e_begin, e_end) for tokens [t_begin, t_end). Each
  // logit's summation order depends only on D.
  void (*route_logits)(
      const RouteArgs&, int e_begin, int e_end, int t_begin, int t_end);
  // Fills row `row` of `q` from x [rows, q.cols]. Null where this build has
  // no int16 path (generic); weights of int16_path only.
  void (*quantize_acts16)(const float* x, int64_t row, const Int16Acts& q);
  // y rows [n_begin, n_end) of tokens [t_begin, t_end). With `xq`, n_begin
  // and n_end are multiples of 4 (whole integer tiles).
  void (*linear_rows)(
      const LinearArgs&, int n_begin, int n_end, int t_begin, int t_end);
  // Output rows [t_begin, t_end) of the gather.
  void (*gather_rows)(const GatherArgs&, int t_begin, int t_end);
  // One attention task (AttentionTask).
  void (*attention_task)(const AttentionArgs&, const AttentionTask&);
  // The output of task `t`'s tile from the partials of its `chunks` chunks,
  // folded in chunk order: the same arithmetic as a task that takes them all.
  void (*attention_merge)(
      const AttentionArgs&, const AttentionTask& t, const float* partials, int chunks);
  // Rows [r_begin, r_end) of B*L (token) rows.
  void (*norm_rope_rows)(const NormRopeArgs&, int r_begin, int r_end);
  // Sum of the 64-bit words of [p, p + bytes), bytes a multiple of 64: the
  // memory-bandwidth probe's loop, built like the kernels so it reads with
  // the same vector width.
  uint64_t (*read_sum)(const uint8_t* p, int64_t bytes);
};

const KernelTable& kernels_generic();
#if defined(FUSED_MOE_X86)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

} // namespace fused_moe::cpu
