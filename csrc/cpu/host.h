// Host-side helpers shared by the CPU evaluation of every Primitive.
#pragma once

#include <vector>

#include "cpu/kernels.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace fused_moe::cpu {

namespace mx = mlx::core;

// The kernels' name for a float dtype (float16, bfloat16 or float32).
FloatType float_type(mx::Dtype t);

// fp32 copy of a float array, converted in parallel blocks.
std::vector<float> to_fp32(const mx::array& a);

// Allocates `outputs` and runs `body(inputs, outputs)` on the primitive's CPU
// stream once the inputs are ready.
template <typename Body>
void launch(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    Body body) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
  }
  // The arrays are captured by value so their buffers outlive the task.
  encoder.dispatch([inputs, outputs, body]() mutable { body(inputs, outputs); });
}

// The same for a single output.
template <typename Body>
void launch(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    Body body) {
  std::vector<mx::array> outputs = {out};
  launch(
      stream, inputs, outputs,
      [body](const std::vector<mx::array>& in, std::vector<mx::array>& outs) mutable {
        body(in, outs[0]);
      });
}

} // namespace fused_moe::cpu
