// The CPU kernels built for AVX2 + FMA (x86-64-v3).
// Compiler flags for this file are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx2
#include "cpu/kernels_impl.h"

namespace fused_moe::cpu {

const KernelTable& kernels_avx2() {
  static const KernelTable table = {
      "avx2", &avx2::gate_up_rows, &avx2::down_rows};
  return table;
}

} // namespace fused_moe::cpu
