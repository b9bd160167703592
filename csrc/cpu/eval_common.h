// Helpers shared by the CPU evaluation (eval_cpu) of every Primitive.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/scheduler.h"

namespace fused_moe::cpu {

namespace mx = mlx::core;

// The kernels' name for a float dtype (float16, bfloat16 or float32).
FloatType float_type(mx::Dtype t);

// fp32 copy of a float array, converted in parallel blocks.
std::vector<float> to_fp32(const mx::array& a);

// The kernels' view of one quantized matrix, stacked [E, rows, cols] or
// dense [rows, cols] (E = 1): its weight, scales and biases arrays (affine).
QuantMatrix quant_matrix(
    const mx::array& w,
    const mx::array& s,
    const mx::array& b,
    int cols,
    int bits,
    int group_size);

// The same in any mode: `b` null for the fp modes, `global_scale` (nvfp4)
// null or float32 [E, period].
QuantMatrix quant_matrix(
    const mx::array& w,
    const mx::array& s,
    const mx::array* b,
    int cols,
    QuantMode mode,
    int bits,
    int group_size,
    const mx::array* global_scale = nullptr,
    int global_scale_period = 1);

// (token, slot) pairs grouped by expert: a counting sort, with the range
// check that keeps every weight access in bounds (an id outside [0, E)
// raises std::out_of_range naming the entry).
struct Grouping {
  std::vector<int32_t> experts, offsets, pairs;

  Grouping(const char* op, const mx::array& indices, int num_experts);

  ExpertGroups view(int k) const {
    return {experts.data(), offsets.data(), pairs.data(),
            static_cast<int>(experts.size()), k};
  }
};

// Integer-ready copy of activation rows, for kernel builds that have the
// VNNI integer path. float32 inputs always take the exact fp32 path, and so
// do rows whose width is not a whole number of 64-code blocks and settings
// the VNNI path has no unpacking for (vnni_path).
struct ActPlanes {
  std::vector<int8_t> hi, lo;
  std::vector<float> scale, sum;
  QuantizedActs view{};
  bool used = false;

  // `allowed`: the caller's own condition for the integer path.
  ActPlanes(const KernelTable& kernels, mx::Dtype dtype,
            const std::vector<float>& x, int64_t rows, int cols,
            QuantMode mode, int bits, int group_size, bool allowed = true);

  const QuantizedActs* get() const {
    return used ? &view : nullptr;
  }
};

// int16 copy of activation rows for the int16 integer path (half precision
// only; float32 inputs keep the exact fp32 path), for settings of int16_path.
struct Int16Planes {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
  Int16Acts view{};
  bool used = false;

  // `allowed`: the caller's own condition (false where VNNI planes are used).
  Int16Planes(const KernelTable& kernels, mx::Dtype dtype,
              const std::vector<float>& x, int64_t rows, int cols,
              QuantMode mode, int bits, int group_size, bool allowed = true);

  const Int16Acts* get() const {
    return used ? &view : nullptr;
  }
};

// Allocates `outputs` and runs `body(inputs, outputs)` on the primitive's CPU
// stream once the inputs are ready.
template <typename Body>
void dispatch(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    Body body) {
  // An error an earlier task left on this stream is raised here, before
  // MLX's encoder counts a new task: raised from inside its enqueue, it
  // would leave that task counted forever, and once more than 10 such tasks
  // pile up every later mx.eval waits for them and never returns (MLX
  // 0.32.4; tests/test_errors.py, test_many_failed_evals_do_not_hang).
  mx::scheduler::check_error(stream);
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
void dispatch(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    Body body) {
  std::vector<mx::array> outputs = {out};
  dispatch(
      stream, inputs, outputs,
      [body](const std::vector<mx::array>& in, std::vector<mx::array>& outs) mutable {
        body(in, outs[0]);
      });
}

} // namespace fused_moe::cpu
