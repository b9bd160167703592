// The CPU kernels built for AVX-512 F/BW/VL/DQ (x86-64-v4);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx512
#include "cpu/kernels_impl.h"
