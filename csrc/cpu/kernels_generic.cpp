// The CPU kernels in portable C++ for any CPU: the vector extensions compile
// to the target's baseline instructions (SSE2 on x86-64, NEON on arm64).
// Unlike the AVX2 and AVX-512 builds, this file gets no ISA flags of its own.
#define FUSED_MOE_ISA_NS generic
#include "cpu/kernels_impl.h"
