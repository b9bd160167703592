// The CPU kernels built for AVX-512 F/BW/VL/DQ (x86-64-v4).
// Compiler flags for this file are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx512
#include "cpu/kernels_impl.h"

namespace fused_moe::cpu {

const KernelTable& kernels_avx512() {
  static const KernelTable table = {
      "avx512", &avx512::gate_up_rows, &avx512::down_rows};
  return table;
}

} // namespace fused_moe::cpu
