// Python bindings: fused_moe._ext. The Python package wraps these in
// fused_moe/ops.py, which takes a PackedExperts instead of raw arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "cpu/isa.h"
#include "cpu/probe.h"
#include "cpu/thread_pool.h"
#include "grid.h"
#include "ops.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "fused_moe native extension: fused low-bit MoE ops for MLX";

  m.def(
      "gate_up_swiglu",
      &fused_moe::gate_up_swiglu,
      "x"_a, "gate_up_weight"_a, "gate_up_scales"_a, "gate_up_biases"_a,
      "indices"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "stream"_a = nb::none(),
      "h = silu(x·Gᵀ) ⊙ (x·Uᵀ) for the selected experts; see "
      "fused_moe.gate_up_swiglu.");

  m.def(
      "down_combine",
      &fused_moe::down_combine,
      "h"_a, "down_weight"_a, "down_scales"_a, "down_biases"_a, "indices"_a,
      "weights"_a, "bits"_a, "group_size"_a, nb::kw_only(),
      "stream"_a = nb::none(),
      "y = Σ_j weights[..., j] · (h[..., j, :]·Dᵀ); see "
      "fused_moe.down_combine.");

  m.def(
      "route",
      &fused_moe::route,
      "x"_a, "gate_weight"_a, "gate_scales"_a.none(), "gate_biases"_a.none(),
      "bias"_a, "k"_a, "bits"_a.none(), "group_size"_a.none(), nb::kw_only(),
      "stream"_a = nb::none(),
      "(indices, weights): sigmoid router with biased top-k; see "
      "fused_moe.route.");

  m.def("set_num_threads", &fused_moe::cpu::set_num_threads, "n"_a,
        "Threads used by the CPU kernels (default: FUSED_MOE_NUM_THREADS or "
        "the number of hardware threads).");
  m.def("get_num_threads", &fused_moe::cpu::num_threads);
  m.def(
      "cpu_isa",
      [] { return std::string(fused_moe::cpu::active_kernels().isa_name); },
      "The CPU kernel build in use: avx512, avx2 or generic.");
  m.def("available_cpu_isas", &fused_moe::cpu::available_isas,
        "CPU kernel builds this machine can run, best first.");

  m.def(
      "timed_read",
      [](nb::ndarray<nb::c_contig, nb::device::cpu> buffer) {
        const auto* data = static_cast<const uint8_t*>(buffer.data());
        const int64_t bytes = static_cast<int64_t>(buffer.nbytes());
        nb::gil_scoped_release release;
        return fused_moe::cpu::timed_read(data, bytes);
      },
      "buffer"_a.noconvert(),
      "Reads every byte of a C-contiguous CPU buffer (e.g. a numpy array) "
      "once on the CPU kernels' threads; returns the seconds taken (the "
      "benchmark's bandwidth probe).");

  auto to_list = [](const auto& values) {
    nb::list l;
    for (int v : values) l.append(v);
    return l;
  };
  m.attr("SUPPORTED_BITS") = nb::tuple(to_list(fused_moe::kSupportedBits));
  m.attr("SUPPORTED_GROUP_SIZES") =
      nb::tuple(to_list(fused_moe::kSupportedGroupSizes));
  m.attr("SUPPORTED_ROUTER_BITS") =
      nb::tuple(to_list(fused_moe::kSupportedRouterBits));
  m.attr("MIN_TOP_K") = fused_moe::kMinTopK;
  m.attr("MAX_TOP_K") = fused_moe::kMaxTopK;
}
