// GPTQ's column pass built for portable C++ (any CPU; compiler-vectorized);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS generic
#include "quant/gptq_impl.h"
