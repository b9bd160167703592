// GPTQ's column pass built for AVX2 (x86-64-v3);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx2
#include "quant/gptq_impl.h"
