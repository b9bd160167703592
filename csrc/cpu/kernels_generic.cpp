// The CPU kernels built for portable C++ (any CPU; compiler-vectorized, NEON on arm64);
// this file's compiler flags are set in CMakeLists.txt.
#define FUSED_MOE_ISA_NS generic
#include "cpu/kernels_impl.h"
