// Apple only (see eval_gpu.h). UNVERIFIED: written without a Mac, never
// compiled; the plan it runs is tested on every platform and by the Linux
// emulator, these lines are not.
#include "metal/eval_gpu.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

namespace fused_moe::metal {

namespace mx = mlx::core;

namespace {

// fused_moe.metallib is installed beside the extension binary.
const std::string& library_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&library_dir), &info)) {
      throw std::runtime_error("fused_moe: cannot locate the extension binary "
                               "to find fused_moe.metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

} // namespace

void encode(
    const LaunchPlan& plan,
    const mx::Stream& stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  if (plan.threadgroups[0] == 0) {
    return; // no tokens
  }
  auto& device = mx::metal::device(stream.device);
  auto* library = device.get_library("fused_moe", library_dir());
  auto* kernel = device.get_kernel(plan.kernel, library);
  if (kernel == nullptr) {
    throw std::runtime_error(
        "fused_moe: Metal kernel '" + plan.kernel +
        "' is missing from fused_moe.metallib");
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
