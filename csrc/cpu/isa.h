// Run-time choice of the CPU kernel build.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace fused_moe::cpu {

// The kernels for the best instruction set this CPU supports, capped by
// FUSED_MOE_ISA (one of "avx512", "avx2", "generic") when that is set.
// Asking for a level above what the CPU supports is an error, not a silent
// downgrade.
const KernelTable& active_kernels();

// Names of the levels this CPU can run, best first.
std::vector<std::string> available_isas();

} // namespace fused_moe::cpu
