// Tile shapes of the Metal kernels: the numbers to tune on a Mac. The kernels
// take them as template parameters (fused_moe.metal) and the host launch plan
// (csrc/metal/launch_plan.cpp) sizes its grids from them, so changing one
// here and rebuilding is all a tuning run needs. Included by Metal sources
// and host C++ alike.
//
// Constraints, checked by static_asserts below and by the launch plan:
// - rows per threadgroup (rows per SIMD group x SIMD groups) divides 32,
//   because D and H are only promised to be multiples of 32;
// - every SIMD group has 32 lanes, each owning kCodesPerLane consecutive
//   codes of a row per step;
// - a staged chunk of scales covers whole steps (quantized.h).
#pragma once

#if defined(__METAL_VERSION__)
#define FM_TILE_CONSTANT constant constexpr
#else
#define FM_TILE_CONSTANT inline constexpr
#endif

namespace fused_moe_tiles {

// Lanes per SIMD group on every Apple GPU.
FM_TILE_CONSTANT int kSimdWidth = 32;
// Consecutive codes of a row one lane reads per step: 2 x bits bytes (4 at 2
// bits, 6 at 3, ..., 16 at 8). 16 divides every group size (nvfp4's is 16),
// so a lane's codes share one scale (and bias).
FM_TILE_CONSTANT int kCodesPerLane = 16;
// Codes of a row one SIMD group covers per step.
FM_TILE_CONSTANT int kCodesPerStep = kSimdWidth * kCodesPerLane;

// Weight staging (quantized.h): a SIMD group copies its rows' scales (and
// affine biases) into threadgroup memory for up to this many groups per row
// at a time (whole rows when they have no more; then the copy is one
// contiguous run). Affine: 32 groups are 64 bytes of a row's bf16/fp16
// scales, two full sectors (128 bytes at fp32); as float, 8 rows take 2 KiB
// for scales and biases together. The fp modes' scales are one byte each, so
// they take 64 groups (64 bytes) at a time, and have no biases.
FM_TILE_CONSTANT int kStageGroups = 32;
FM_TILE_CONSTANT int kStageGroupsFp = 64;

// Decode and prefill: (token, slot) pairs at or above this count take the
// prefill kernels (grouped by expert); fewer take decode (matrix-vector).
// 64 pairs is 8 tokens at k=8: from there several tokens start to share
// experts, which is when reading each expert once pays for the sort.
FM_TILE_CONSTANT int kPrefillMinPairs = 64;

// Gate/up, decode. One SIMD group streams kGateUpDecodeRows packed weight
// rows of one expert for one (token, slot) pair: 8 rows in flight, the upper
// end of the 4-8 that public Apple-GPU work found fastest. With a gated
// activation they are 4 gate rows and their up rows (4 rows of h); without
// one, 8 fc1 rows (8 rows of h). Two SIMD groups per threadgroup keep
// threadgroups small, so the few threadgroups of a one-token call still
// spread over every core.
FM_TILE_CONSTANT int kGateUpDecodeRows = 8;
FM_TILE_CONSTANT int kGateUpDecodeSimdgroups = 2;

// Gate/up, prefill. A threadgroup takes the experts whose runs start among
// kGateUpPrefillPairs consecutive (token, slot) pairs of the expert-sorted
// order, each run whole, and reuses each weight load across up to that many
// pairs of one expert. Rows per SIMD group are halved against decode because
// every row holds one accumulator per pair (4 x 8 = 32 registers of
// accumulators per lane).
FM_TILE_CONSTANT int kGateUpPrefillRows = 4;
FM_TILE_CONSTANT int kGateUpPrefillSimdgroups = 2;
FM_TILE_CONSTANT int kGateUpPrefillPairs = 8;

// Down, decode. One SIMD group owns kDownDecodeRows output rows of one
// token and loops over its k experts. Down rows are short (H = 1536 codes,
// 3 steps), so more rows in flight per SIMD group make up for fewer steps;
// one SIMD group per threadgroup keeps D / 8 = 384 threadgroups per token.
FM_TILE_CONSTANT int kDownDecodeRows = 8;
FM_TILE_CONSTANT int kDownDecodeSimdgroups = 1;

// Down, prefill. A threadgroup owns kDownPrefillRows x kDownPrefillSimdgroups
// output rows of kDownPrefillTokens consecutive tokens, walks their pairs in
// expert order and reuses each weight load across kDownPrefillPairBatch pairs
// of one expert. With the combine, the fp32 sums live in threadgroup memory
// (tokens x rows x 4 bytes = 512 bytes), written out once at the end; per
// slot, each pair's rows are written as they are done.
FM_TILE_CONSTANT int kDownPrefillRows = 4;
FM_TILE_CONSTANT int kDownPrefillSimdgroups = 2;
FM_TILE_CONSTANT int kDownPrefillTokens = 16;
FM_TILE_CONSTANT int kDownPrefillPairBatch = 4;

// The router (route.h). One threadgroup per token: kRouteSimdgroups SIMD
// groups share the E gate rows, kRouteRowsPerSimdgroup rows in flight per
// SIMD group (each x load serves that many rows). The logits, scores and
// biased scores of a token live in threadgroup memory, so E is capped at
// kRouteMaxExperts (3 x 4 KiB of the 32 KiB); MiniMax has 154 experts,
// other public MoE routers at most a few hundred.
FM_TILE_CONSTANT int kRouteSimdgroups = 4;
FM_TILE_CONSTANT int kRouteRowsPerSimdgroup = 4;
FM_TILE_CONSTANT int kRouteMaxExperts = 1024;

// Rows of h per threadgroup: gated activations use two packed rows per row
// of h, the others one; both must divide 32.
static_assert(32 % (kGateUpDecodeRows / 2 * kGateUpDecodeSimdgroups) == 0 &&
                  32 % (kGateUpDecodeRows * kGateUpDecodeSimdgroups) == 0,
              "gate_up decode rows per threadgroup must divide 32");
static_assert(32 % (kGateUpPrefillRows / 2 * kGateUpPrefillSimdgroups) == 0 &&
                  32 % (kGateUpPrefillRows * kGateUpPrefillSimdgroups) == 0,
              "gate_up prefill rows per threadgroup must divide 32");
static_assert(kGateUpDecodeRows % 2 == 0 && kGateUpPrefillRows % 2 == 0,
              "gated activations take gate and up rows in pairs");
static_assert(32 % (kDownDecodeRows * kDownDecodeSimdgroups) == 0,
              "down decode rows per threadgroup must divide 32");
static_assert(32 % (kDownPrefillRows * kDownPrefillSimdgroups) == 0,
              "down prefill rows per threadgroup must divide 32");
static_assert(kCodesPerLane == 16, "the unpacking reads 16 codes per lane");

} // namespace fused_moe_tiles
