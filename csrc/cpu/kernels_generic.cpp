// The CPU kernels built for portable C++ (any CPU; auto-vectorized, NEON on arm64).
// Compiler flags for this file are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS generic
#include "cpu/kernels_impl.h"

namespace fused_moe::cpu {

const KernelTable& kernels_generic() {
  static const KernelTable table = {
      "generic", &generic::gate_up_rows, &generic::down_rows};
  return table;
}

} // namespace fused_moe::cpu
