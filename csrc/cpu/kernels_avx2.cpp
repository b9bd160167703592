// The CPU kernels built for AVX2 + FMA (x86-64-v3);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx2
#include "cpu/kernels_impl.h"
