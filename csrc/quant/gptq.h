// GPTQ's column pass over one block of columns, for the calibrated
// quantizer (python/fused_moe/quant/quantizer.py).
//
// The quantizer factors the hessian once per matrix (H = Ũ·Ũᵀ, Ũ upper
// triangular: the Cholesky factor of H with the column order reversed) and
// walks the columns in blocks: this op rounds one block's columns in order,
// spreading each column's rounding error over the block's later columns;
// numpy's BLAS then carries the block's errors to the columns after it in
// one matmul. With δ_k = w_k − ŵ_k (original weight minus its dequantized
// code), column l is rounded at
//
//   w_l + Σ_{k<l} δ_k · Ũ_kl / Ũ_ll
//
// which is GPTQ's update (Frantar et al. 2022) written with H's factor
// rather than that of H⁻¹ (the nearest-plane form: the same columns and
// codes in exact arithmetic, half the factorization's work, no inverse).
//
// At each group's first column the group's (scale, bias) is chosen by the
// weighted search of quantizer.py's `_search` on the group's weights as
// GPTQ has them then (the columns before it rounded, the group's own not
// yet: see run_tile), operation for operation in float32 (no fused
// multiply-adds, sums in numpy's pairwise order), so that a block whose
// columns receive no updates gives exactly the numpy search's result; its
// first candidate is mx.quantize's own pair of the group rounded to the
// stored dtype. The codes are written in MLX's packing.
//
// The matrix is held transposed, [in, rows] (one input column per row), so
// the op vectorizes over weight rows; rows are independent, so any number of
// threads gives identical bits, and so does every CPU level (no level uses
// an instruction the others round differently).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace fused_moe::quant {

// Columns one call processes at most (the quantizer's block).
constexpr int kGptqMaxBlock = 128;

struct GptqBlockArgs {
  float* cur; // [cols, rows] the block's weights as updated so far; each
              // column's error is added to the later columns in place
  const float* orig; // [cols, rows] the same columns' original weights
  const float* coef; // [cols, cols] coef[k, l] = Ũ_kl / Ũ_ll (read for k < l)
  const float* diag; // [cols] H_jj, the search's column weights
  uint32_t* packed; // [rows, packed_words] the matrix's codes in MLX's
                    // packing; the block writes its own columns' words
  int64_t packed_words; // words per row of `packed`
  int64_t first_word; // the block's first word in a row (its first column
                      // times bits / 32)
  float* delta; // [cols, rows] out: δ = w − ŵ per weight
  float* scales; // [cols / group_size, rows] out, rounded to scale_type
  float* biases; // same
  int64_t rows;
  int cols; // a multiple of group_size, at most kGptqMaxBlock
  int bits;
  int group_size;
  cpu::FloatType scale_type; // the dtype scales and biases are stored in
};

// A buffer's name and shape as the caller holds it, for the checks.
struct GptqBuffer {
  std::string name;
  std::vector<int64_t> shape;
};

// Checks the arguments (`given`: the shapes of cur, orig, coef, diag,
// packed, delta, scales and biases, in that order) and runs the block on the
// CPU kernels' threads. std::invalid_argument names the buffer at fault.
void gptq_block(const GptqBlockArgs& args, const std::vector<GptqBuffer>& given);

// Rows [r_begin, r_end) of one block, per CPU level.
namespace generic {
void gptq_rows(const GptqBlockArgs& args, int64_t r_begin, int64_t r_end);
}
#if defined(FUSED_MOE_X86)
namespace avx2 {
void gptq_rows(const GptqBlockArgs& args, int64_t r_begin, int64_t r_end);
}
namespace avx512 {
void gptq_rows(const GptqBlockArgs& args, int64_t r_begin, int64_t r_end);
}
#endif

// Rows per unit of work of the threads (whole vectors on every level).
constexpr int kGptqTileRows = 16;

} // namespace fused_moe::quant
