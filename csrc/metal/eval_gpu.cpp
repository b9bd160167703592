// Apple only (see eval_gpu.h). Written without a Mac: on Linux CI
// type-checks it against MLX's real macOS headers and checks that every MLX
// symbol it uses is exported by the macOS libmlx.dylib (tests/tools/msl_checks);
// it has never run. The plan it runs is tested on every platform and by the
// Linux emulator.
#include "metal/eval_gpu.h"

#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "metal/metal_source.h"

namespace fused_moe::metal {

namespace mx = mlx::core;

namespace {

// The pipeline of `kernel`, compiled on its first use from the embedded
// source with only that kernel instantiated. MLX caches the library under
// its name for the life of the process (later calls are a map lookup),
// compiles with its default options (safe math) at the Metal language
// version of the running macOS, and throws with the compiler's log on
// failure. Nothing has been encoded yet when this throws, so the stream
// stays usable for other ops.
MTL::ComputePipelineState* pipeline(mx::metal::Device& device,
                                    const std::string& kernel) {
  try {
    auto* library = device.get_library(
        library_name(kernel), [&kernel] { return kernel_source(kernel); });
    return device.get_kernel(kernel, library);
  } catch (const std::exception& e) {
    throw std::runtime_error("fused_moe: compiling Metal kernel '" + kernel +
                             "' failed: " + e.what());
  }
}

} // namespace

void encode(
    const LaunchPlan& plan,
    const mx::Stream& stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  MTL::ComputePipelineState* kernel = nullptr;
  if (plan.threadgroups[0] != 0) {
    kernel = pipeline(mx::metal::device(stream.device), plan.kernel);
  }
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  if (kernel == nullptr) {
    return; // no tokens
  }
  auto& encoder = mx::metal::get_command_encoder(stream);
  encoder.set_compute_pipeline_state(kernel);
  for (const auto& b : plan.buffers) {
    switch (b.source) {
      case Source::input:
        encoder.set_input_array(inputs[b.index], b.slot);
        break;
      case Source::output:
        encoder.set_output_array(outputs[b.index], b.slot);
        break;
      case Source::args:
      case Source::absent:
        // An absent input's slot is never read (its flag is off in the
        // arguments), but Metal wants every argument bound.
        encoder.set_bytes(plan.args.data(), int(plan.args.size()), b.slot);
        break;
    }
  }
  encoder.dispatch_threadgroups(
      MTL::Size(plan.threadgroups[0], plan.threadgroups[1],
                plan.threadgroups[2]),
      MTL::Size(plan.threads_per_threadgroup[0],
                plan.threads_per_threadgroup[1],
                plan.threads_per_threadgroup[2]));
}

void encode(
    const LaunchPlan& plan,
    const mx::Stream& stream,
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  // An mx::array is a handle: the copy shares out's data.
  std::vector<mx::array> outputs = {out};
  encode(plan, stream, inputs, outputs);
}

} // namespace fused_moe::metal
