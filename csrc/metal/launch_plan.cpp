// The Metal launch plan (see launch_plan.h). The tile constants and the
// argument structs come from the headers the kernels include, and the kernel
// names from the same allow-list macros fused_moe.metal instantiates.
#include "metal/launch_plan.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "metal/args.h"
#include "metal/allow_list.h"
#include "metal/tile_shapes.h"

namespace fused_moe::metal {

namespace tiles = fused_moe_tiles;

#define FM_NAME_CASE(name, ...) \
  case name:                    \
    return #name;

const char* op_name(Op op) {
  using enum Op;
  switch (op) { FM_FOR_EACH_OP(FM_NAME_CASE) }
  return "?";
}

const char* variant_name(Variant v) {
  using enum Variant;
  switch (v) { FM_FOR_EACH_VARIANT(FM_NAME_CASE) }
  return "?";
}

const char* dtype_name(Dtype t) {
  using enum Dtype;
  switch (t) { FM_FOR_EACH_DTYPE(FM_NAME_CASE) }
  return "?";
}
#undef FM_NAME_CASE

namespace {

// Finds `name` among the names of an enum's values [0, count).
template <typename Enum, typename NameOf>
Enum from_name(const std::string& name, int count, NameOf name_of,
               const char* what) {
  std::string valid;
  for (int i = 0; i < count; ++i) {
    if (name == name_of(Enum(i))) {
      return Enum(i);
    }
    valid += std::string(i ? ", " : "") + name_of(Enum(i));
  }
  throw std::invalid_argument(std::string(what) + " must be one of " + valid +
                              ", got '" + name + "'");
}

#define FM_COUNT(...) +1
constexpr int kOps = 0 FM_FOR_EACH_OP(FM_COUNT);
constexpr int kDtypes = 0 FM_FOR_EACH_DTYPE(FM_COUNT);
#undef FM_COUNT

} // namespace

Op op_from_name(const std::string& name) {
  return from_name<Op>(name, kOps, op_name, "op");
}

Dtype dtype_from_name(const std::string& name) {
  return from_name<Dtype>(name, kDtypes, dtype_name, "dtype");
}

Variant choose_variant(int tokens, int top_k) {
  return int64_t(tokens) * top_k >= tiles::kPrefillMinPairs ? Variant::prefill
                                                            : Variant::decode;
}

TileShape tile_shape(Op op, Variant v) {
  if (op == Op::route) {
    return {tiles::kRouteRowsPerSimdgroup, tiles::kRouteSimdgroups, 0, 1};
  }
  if (op == Op::gate_up_swiglu) {
    if (v == Variant::decode) {
      return {tiles::kGateUpDecodeRowPairs, tiles::kGateUpDecodeSimdgroups, 0,
              0};
    }
    return {tiles::kGateUpPrefillRowPairs, tiles::kGateUpPrefillSimdgroups,
            tiles::kGateUpPrefillPairs, 0};
  }
  if (v == Variant::decode) {
    return {tiles::kDownDecodeRows, tiles::kDownDecodeSimdgroups, 0, 1};
  }
  return {tiles::kDownPrefillRows, tiles::kDownPrefillSimdgroups, 0,
          tiles::kDownPrefillTokens};
}

int down_prefill_tokens_per_threadgroup() {
  return tiles::kDownPrefillTokens;
}

const std::vector<std::string>& instantiated_kernels() {
  static const std::vector<std::string> names = {
#define FM_HOST_NAME(op, variant, dtype_name, metal_type, bits, gs) \
  FM_KERNEL_NAME(op, variant, dtype_name, bits, gs),
      FM_FOR_EACH_KERNEL(FM_HOST_NAME)
#undef FM_HOST_NAME
#define FM_HOST_ROUTE_NAME(dtype_name, metal_type, gate_name, family, arg) \
  FM_ROUTE_KERNEL_NAME(dtype_name, gate_name),
      FM_FOR_EACH_ROUTE_KERNEL(FM_HOST_ROUTE_NAME)
#undef FM_HOST_ROUTE_NAME
  };
  return names;
}

namespace {

// `name` if fused_moe.metal instantiates it; else std::invalid_argument
// listing the instantiated kernels whose names start with `family`.
std::string instantiated(const std::string& name, const std::string& family) {
  const auto& all = instantiated_kernels();
  if (std::find(all.begin(), all.end(), name) == all.end()) {
    std::string same_family;
    for (const auto& n : all) {
      if (n.rfind(family, 0) == 0) {
        same_family += (same_family.empty() ? "" : ", ") + n;
      }
    }
    throw std::invalid_argument(
        "fused_moe: Metal kernel '" + name + "' is not instantiated "
        "(metal/allow_list.h); instantiated " + family + "* kernels: " +
        same_family);
  }
  return name;
}

} // namespace

std::string kernel_name(Op op, Variant v, Dtype t, int bits, int group_size) {
  return instantiated(
      std::string(op_name(op)) + "_" + variant_name(v) + "_" + dtype_name(t) +
          "_b" + std::to_string(bits) + "_gs" + std::to_string(group_size),
      std::string(op_name(op)) + "_" + variant_name(v) + "_");
}

std::string route_kernel_name(Dtype x, int bits, int group_size, Dtype gate) {
  const std::string form = bits == 0
      ? std::string(dtype_name(gate))
      : "b" + std::to_string(bits) + "_gs" + std::to_string(group_size);
  return instantiated(
      std::string("route_") + dtype_name(x) + "_gate_" + form, "route_");
}

namespace {

[[noreturn]] void fail(const Problem& p, const std::string& msg) {
  throw std::invalid_argument(
      std::string("fused_moe.") + op_name(p.op) + " (Metal launch plan): " +
      msg);
}

void check_positive(const Problem& p, const char* what, int v) {
  if (v < 1) {
    fail(p, std::string(what) + "=" + std::to_string(v) + " must be >= 1");
  }
}

uint32_t ceil_div(int64_t a, int64_t b) {
  return static_cast<uint32_t>((a + b - 1) / b);
}

template <typename Args>
std::vector<uint8_t> as_bytes(const Args& a) {
  std::vector<uint8_t> bytes(sizeof(Args));
  std::memcpy(bytes.data(), &a, sizeof(Args));
  return bytes;
}

// The router: one threadgroup per token (metal/route.h).
LaunchPlan make_route_plan(const Problem& p) {
  if (p.tokens < 0) {
    fail(p, "tokens=" + std::to_string(p.tokens) + " must be >= 0");
  }
  check_positive(p, "top_k", p.top_k);
  check_positive(p, "hidden (D)", p.hidden);
  check_positive(p, "experts (E)", p.experts);
  if (p.top_k > p.experts) {
    fail(p, "top_k=" + std::to_string(p.top_k) + " is more than E=" +
             std::to_string(p.experts));
  }
  if (p.experts > tiles::kRouteMaxExperts) {
    // The kernel keeps a token's E logits in threadgroup memory.
    fail(p, "E=" + std::to_string(p.experts) + " experts exceed the " +
             std::to_string(tiles::kRouteMaxExperts) +
             " the Metal router kernel holds (kRouteMaxExperts, "
             "metal/tile_shapes.h)");
  }
  const bool quantized = p.bits != 0;
  if (quantized && (p.group_size < 4 || p.hidden % p.group_size != 0)) {
    fail(p, "D=" + std::to_string(p.hidden) +
             " must be a multiple of group_size=" +
             std::to_string(p.group_size));
  }

  LaunchPlan plan;
  plan.problem = p;
  plan.variant = Variant::decode;
  plan.kernel = route_kernel_name(p.dtype, p.bits, p.group_size, p.gate_dtype);
  const TileShape tile = tile_shape(Op::route, plan.variant);
  plan.threads_per_threadgroup = {
      uint32_t(tile.simdgroups * tiles::kSimdWidth), 1, 1};
  plan.threadgroups = p.tokens == 0
      ? std::array<uint32_t, 3>{0, 0, 0}
      : std::array<uint32_t, 3>{uint32_t(p.tokens), 1, 1};
  // Slots in the Primitive's input order, then its two outputs.
  int slot = 0;
  auto bind = [&](const char* name, Source source, int index) {
    plan.buffers.push_back({slot++, name, source, index});
  };
  bind("x", Source::input, 0);
  bind("gate_weight", Source::input, 1);
  bind("bias", Source::input, 2);
  if (quantized) {
    bind("gate_scales", Source::input, 3);
    bind("gate_biases", Source::input, 4);
  }
  bind("indices", Source::output, 0);
  bind("weights", Source::output, 1);
  bind("args", Source::args, -1);
  fused_moe_args::RouteArgs a{};
  a.tokens = p.tokens;
  a.top_k = p.top_k;
  a.hidden = p.hidden;
  a.experts = p.experts;
  a.groups_per_row = quantized ? p.hidden / p.group_size : 0;
  plan.args = as_bytes(a);
  return plan;
}

} // namespace

LaunchPlan make_launch_plan(const Problem& p) {
  if (p.op == Op::route) {
    return make_route_plan(p);
  }
  if (p.tokens < 0) {
    fail(p, "tokens=" + std::to_string(p.tokens) + " must be >= 0");
  }
  check_positive(p, "top_k", p.top_k);
  check_positive(p, "hidden (D)", p.hidden);
  check_positive(p, "intermediate (H)", p.intermediate);
  check_positive(p, "experts (E)", p.experts);
  // The packed row read along the kernel's inputs, and its output rows.
  const bool gate_up = p.op == Op::gate_up_swiglu;
  const int inputs = gate_up ? p.hidden : p.intermediate;
  const int out_rows = gate_up ? p.intermediate : p.hidden;
  if (inputs % tiles::kCodesPerLane != 0 || inputs % p.group_size != 0) {
    fail(p, std::string(gate_up ? "D" : "H") + "=" + std::to_string(inputs) +
             " must be a multiple of 16 and of group_size=" +
             std::to_string(p.group_size));
  }
  const int64_t pairs = int64_t(p.tokens) * p.top_k;
  if (pairs > int64_t(UINT32_MAX) / std::max(p.experts + 1, 1)) {
    fail(p, "T*k=" + std::to_string(pairs) + " pairs with E=" +
             std::to_string(p.experts) + " exceed the 32-bit sort keys");
  }

  LaunchPlan plan;
  plan.problem = p;
  plan.variant = choose_variant(p.tokens, p.top_k);
  plan.kernel =
      kernel_name(p.op, plan.variant, p.dtype, p.bits, p.group_size);
  const TileShape tile = tile_shape(p.op, plan.variant);
  if (out_rows % tile.rows_per_threadgroup() != 0) {
    fail(p, std::string(gate_up ? "H" : "D") + "=" + std::to_string(out_rows) +
             " is not a multiple of the " +
             std::to_string(tile.rows_per_threadgroup()) +
             " rows per threadgroup of " + plan.kernel);
  }
  plan.threads_per_threadgroup = {
      uint32_t(tile.simdgroups * tiles::kSimdWidth), 1, 1};
  const uint32_t row_blocks = out_rows / tile.rows_per_threadgroup();
  const bool prefill = plan.variant == Variant::prefill;
  uint32_t blocks_y;
  if (gate_up) {
    blocks_y = prefill ? ceil_div(pairs, tile.pairs_per_threadgroup)
                       : uint32_t(pairs);
  } else {
    blocks_y = ceil_div(p.tokens, tile.tokens_per_threadgroup);
  }
  plan.threadgroups =
      pairs == 0 ? std::array<uint32_t, 3>{0, 0, 0}
                 : std::array<uint32_t, 3>{row_blocks, blocks_y, 1};

  const int row_bytes = inputs * p.bits / 8;
  const int groups = inputs / p.group_size;
  int slot = 0;
  auto in = [&](const char* name, int input) {
    plan.buffers.push_back({slot++, name, Source::input, input});
  };
  if (gate_up) {
    in("x", 0);
    in("gate_up_weight", 1);
    in("gate_up_scales", 2);
    in("gate_up_biases", 3);
    in("indices", 4);
    if (prefill) {
      in("order", 5);
    }
    plan.buffers.push_back({slot++, "h", Source::output, 0});
  } else {
    in("h", 0);
    in("down_weight", 1);
    in("down_scales", 2);
    in("down_biases", 3);
    in("indices", 4);
    in("weights", 5);
    if (prefill) {
      in("order", 6);
    }
    plan.buffers.push_back({slot++, "y", Source::output, 0});
  }
  plan.buffers.push_back({slot++, "args", Source::args, -1});
  fused_moe_args::FusedMoeArgs a{};
  a.tokens = p.tokens;
  a.top_k = p.top_k;
  a.hidden = p.hidden;
  a.intermediate = p.intermediate;
  a.experts = p.experts;
  a.row_bytes = row_bytes; // of the rows this kernel reads
  a.groups_per_row = groups;
  a.pairs = uint32_t(pairs);
  plan.args = as_bytes(a);
  return plan;
}

} // namespace fused_moe::metal
