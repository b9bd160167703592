// fused_moe ops: every public op and its MLX Primitive, one file pair per op
// under ops/ (the checks, the Primitive, the GPU entry point), as MLX's
// extensions are laid out; the shared checking helpers are in ops/common.h.
// The op functions validate everything; the Primitives only ever see
// contiguous, checked inputs.
#pragma once

#include "ops/attention.h"
#include "ops/down.h"
#include "ops/gate_up.h"
#include "ops/norm_rope.h"
#include "ops/quantized_embedding.h"
#include "ops/quantized_matmul.h"
#include "ops/route.h"
