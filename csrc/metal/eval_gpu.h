// Apple only: hands a launch plan to MLX's Metal command encoder. Built when
// MLX has Metal (CMakeLists.txt defines FUSED_MOE_METAL); nothing else in
// the project depends on Metal headers.
#pragma once

#include <vector>

#include "metal/launch_plan.h"
#include "mlx/array.h"
#include "mlx/stream.h"

namespace fused_moe::metal {

void encode(
    const LaunchPlan& plan,
    const mlx::core::Stream& stream,
    const std::vector<mlx::core::array>& inputs,
    std::vector<mlx::core::array>& outputs);

// The one-output ops.
void encode(
    const LaunchPlan& plan,
    const mlx::core::Stream& stream,
    const std::vector<mlx::core::array>& inputs,
    mlx::core::array& out);

} // namespace fused_moe::metal
