// The CPU kernels built for AVX-512 F/BW/VL/DQ + VNNI + VBMI
// (Ice Lake, Zen 4 and later);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx512
#include "cpu/kernels_impl.h"
