#include "quant/gptq.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cpu/isa.h"
#include "cpu/thread_pool.h"

namespace fused_moe::quant {

namespace {

using RowsFn = void (*)(const GptqBlockArgs&, int64_t, int64_t);

// The build of the level the CPU kernels use (FUSED_MOE_ISA caps both).
RowsFn rows_fn() {
  const std::string isa = cpu::active_kernels().isa_name;
#if defined(FUSED_MOE_X86)
  if (isa == "avx512") {
    return &avx512::gptq_rows;
  }
  if (isa == "avx2") {
    return &avx2::gptq_rows;
  }
#endif
  if (isa == "generic") {
    return &generic::gptq_rows;
  }
  throw std::runtime_error("gptq_block: no build for CPU level " + isa);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    o << (i ? ", " : "") << s[i];
  }
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

} // namespace

void gptq_block(const GptqBlockArgs& a, const std::vector<GptqBuffer>& given) {
  // The op's own limits (the quantizer checks MLX's bits and group sizes):
  // codes fit a byte; a group is whole 8-value runs of numpy's pairwise sum.
  if (a.bits < 1 || a.bits > 8) {
    throw std::invalid_argument("gptq_block: bits=" + std::to_string(a.bits) + " is outside 1..8");
  }
  if (a.group_size < 8 || a.group_size > kGptqMaxBlock || a.group_size % 8) {
    throw std::invalid_argument(
        "gptq_block: group_size=" + std::to_string(a.group_size) +
        " is not a multiple of 8 in 8.." + std::to_string(kGptqMaxBlock));
  }
  if (a.cols < 1 || a.cols > kGptqMaxBlock || a.cols % a.group_size || (a.cols * a.bits) % 32 ||
      a.rows < 1) {
    throw std::invalid_argument(
        "gptq_block: cur has shape " + shape_str({a.cols, a.rows}) +
        "; expected (cols, rows) with cols a multiple of group_size " +
        std::to_string(a.group_size) + " whose codes fill whole 32-bit words, at most " +
        std::to_string(kGptqMaxBlock) + ", rows at least 1");
  }
  const int64_t cols = a.cols, groups = a.cols / a.group_size;
  const int64_t words = a.cols * a.bits / 32;
  if (a.first_word < 0 || a.first_word + words > a.packed_words) {
    throw std::invalid_argument(
        "gptq_block: the block's words [" + std::to_string(a.first_word) + ", " +
        std::to_string(a.first_word + words) + ") are outside packed's " +
        std::to_string(a.packed_words) + " words per row");
  }
  const std::vector<std::vector<int64_t>> expected = {
      {cols, a.rows}, {cols, a.rows}, {cols, cols}, {cols},
      {a.rows, a.packed_words}, {cols, a.rows}, {groups, a.rows}, {groups, a.rows}};
  if (given.size() != expected.size()) {
    throw std::invalid_argument("gptq_block: expected 8 buffers");
  }
  for (size_t i = 0; i < given.size(); ++i) {
    if (given[i].shape != expected[i]) {
      throw std::invalid_argument(
          "gptq_block: " + given[i].name + " has shape " + shape_str(given[i].shape) +
          ", expected " + shape_str(expected[i]));
    }
  }
  const RowsFn fn = rows_fn();
  const int64_t tiles = (a.rows + kGptqTileRows - 1) / kGptqTileRows;
  cpu::parallel_for(static_cast<int>(tiles), [&](int t) {
    const int64_t r0 = static_cast<int64_t>(t) * kGptqTileRows;
    fn(a, r0, std::min(a.rows, r0 + kGptqTileRows));
  });
}

} // namespace fused_moe::quant
