// GPTQ's column pass built for AVX-512 F/BW/VL/DQ;
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS avx512
#include "quant/gptq_impl.h"
