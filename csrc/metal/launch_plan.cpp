// The Metal launch plan (see launch_plan.h). The tile constants and the
// argument structs come from the headers the kernels include, and the kernel
// names from the same allow-list macros fused_moe.metal instantiates.
#include "metal/launch_plan.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <string_view>
#include <unordered_set>

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

TileShape tile_shape(Op op, Variant v, bool gated) {
  if (op == Op::route) {
    return {tiles::kRouteRowsPerSimdgroup, tiles::kRouteSimdgroups, 0, 1};
  }
  if (op == Op::gate_up) {
    // Gated: gate and up rows in pairs, two packed rows per row of h.
    const int per_row = gated ? 2 : 1;
    if (v == Variant::decode) {
      return {tiles::kGateUpDecodeRows / per_row, tiles::kGateUpDecodeSimdgroups,
              0, 0};
    }
    return {tiles::kGateUpPrefillRows / per_row, tiles::kGateUpPrefillSimdgroups,
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
#define FM_HOST_GATE_UP_NAME(an, act, gated, variant, dn, mt, qn, mode, bits, gs) \
  FM_GATE_UP_KERNEL_NAME(an, variant, dn, qn),
      FM_FOR_EACH_GATE_UP_KERNEL(FM_HOST_GATE_UP_NAME)
#undef FM_HOST_GATE_UP_NAME
#define FM_HOST_DOWN_NAME(variant, dn, mt, qn, mode, bits, gs) \
  FM_DOWN_KERNEL_NAME(variant, dn, qn),
      FM_FOR_EACH_DOWN_KERNEL(FM_HOST_DOWN_NAME)
#undef FM_HOST_DOWN_NAME
#define FM_HOST_ROUTE_NAME(dtype_name, metal_type, gate_name, family, arg) \
  FM_ROUTE_KERNEL_NAME(dtype_name, gate_name),
      FM_FOR_EACH_ROUTE_KERNEL(FM_HOST_ROUTE_NAME)
#undef FM_HOST_ROUTE_NAME
  };
  return names;
}

namespace {

// The allow-list is csrc/supported.h's grid, checked here at compile time:
// the macros of metal/allow_list.h cannot read supported.h's arrays, so the
// two lists are written twice and must agree.
struct QuantEntry {
  const char* name;
  int mode, bits, group_size;
};
#define FM_QUANT_ENTRY(qn, mode, bits, gs, ...) {#qn, mode, bits, gs},
constexpr QuantEntry kQuants[] = {FM_FOR_EACH_QUANT(FM_QUANT_ENTRY, )};
#undef FM_QUANT_ENTRY
#define FM_LIST_ITEM(v, ...) v,
constexpr int kAllowedBits[] = {FM_FOR_EACH_BITS(FM_LIST_ITEM, )};
constexpr int kAllowedGroupSizes[] = {FM_FOR_EACH_GROUP_SIZE(FM_LIST_ITEM, )};
#undef FM_LIST_ITEM
struct ActivationEntry {
  std::string_view name;
  int id;
  bool gated;
};
#define FM_ACTIVATION_ENTRY(name, id, gated, ...) {#name, id, gated != 0},
constexpr ActivationEntry kAllowedActivations[] = {
    FM_FOR_EACH_ACTIVATION(FM_ACTIVATION_ENTRY, )};
#undef FM_ACTIVATION_ENTRY

constexpr bool allow_list_is_the_grid() {
  constexpr size_t affine = kSupportedBits.size() * kSupportedGroupSizes.size();
  if (std::size(kAllowedBits) != kSupportedBits.size() ||
      std::size(kAllowedGroupSizes) != kSupportedGroupSizes.size() ||
      std::size(kQuants) != affine + kFpModes.size() ||
      std::size(kAllowedActivations) != kActivations.size()) {
    return false;
  }
  for (size_t i = 0; i < kSupportedBits.size(); ++i) {
    if (kAllowedBits[i] != kSupportedBits[i]) {
      return false;
    }
  }
  for (size_t i = 0; i < kSupportedGroupSizes.size(); ++i) {
    if (kAllowedGroupSizes[i] != kSupportedGroupSizes[i]) {
      return false;
    }
  }
  for (size_t i = 0; i < kFpModes.size(); ++i) {
    const QuantEntry& q = kQuants[affine + i];
    const FpModeSpec& m = kFpModes[i];
    if (q.mode != static_cast<int>(m.mode) || q.bits != m.bits ||
        q.group_size != m.group_size || std::string_view(q.name) != m.name) {
      return false;
    }
  }
  for (size_t i = 0; i < kActivations.size(); ++i) {
    const ActivationEntry& a = kAllowedActivations[i];
    if (a.id != static_cast<int>(kActivations[i].kind) ||
        a.name != kActivations[i].name || a.gated != kActivations[i].gated) {
      return false;
    }
  }
  return true;
}
static_assert(allow_list_is_the_grid(),
              "metal/allow_list.h must list exactly csrc/supported.h's affine "
              "bits, group sizes, fp modes and activations, in the same order");

// `name` if fused_moe.metal instantiates it; else std::invalid_argument
// listing the instantiated kernels whose names start with `family`.
std::string instantiated(const std::string& name, const std::string& family) {
  static const std::unordered_set<std::string> all(
      instantiated_kernels().begin(), instantiated_kernels().end());
  if (all.count(name) == 0) {
    std::string same_family;
    for (const auto& n : instantiated_kernels()) {
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

bool has_expert_kernels(QuantMode mode, int bits, int group_size) {
  return std::any_of(std::begin(kQuants), std::end(kQuants), [&](const QuantEntry& q) {
    return q.mode == static_cast<int>(mode) && q.bits == bits &&
        q.group_size == group_size;
  });
}

std::string quant_name(QuantMode mode, int bits, int group_size) {
  for (const auto& q : kQuants) {
    if (q.mode == static_cast<int>(mode) && q.bits == bits &&
        q.group_size == group_size) {
      return q.name;
    }
  }
  std::string all;
  for (const auto& q : kQuants) {
    all += std::string(all.empty() ? "" : ", ") + kModeNames[q.mode] + " b" +
        std::to_string(q.bits) + " gs" + std::to_string(q.group_size);
  }
  throw std::invalid_argument(
      std::string("fused_moe: no Metal kernel for mode ") + mode_name(mode) +
      " bits=" + std::to_string(bits) + " group_size=" +
      std::to_string(group_size) + " (metal/allow_list.h); supported: " + all);
}

std::string gate_up_kernel_name(
    Activation activation, Variant v, Dtype t, QuantMode mode, int bits,
    int group_size) {
  const std::string family = std::string("gate_up_") +
      activation_spec(activation).name + "_" + variant_name(v) + "_";
  return instantiated(
      family + dtype_name(t) + "_" + quant_name(mode, bits, group_size), family);
}

std::string down_kernel_name(
    Variant v, Dtype t, QuantMode mode, int bits, int group_size) {
  const std::string family = std::string("down_") + variant_name(v) + "_";
  return instantiated(
      family + dtype_name(t) + "_" + quant_name(mode, bits, group_size), family);
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
  if (p.global_scale && p.mode != QuantMode::nvfp4) {
    fail(p, std::string("global_scale is only for mode nvfp4, not ") +
             mode_name(p.mode));
  }
  // The packed row read along the kernel's inputs, and its output rows.
  const bool gate_up = p.op == Op::gate_up;
  const bool gated = gate_up && activation_spec(p.activation).gated;
  const int inputs = gate_up ? p.hidden : p.intermediate;
  const int out_rows = gate_up ? p.intermediate : p.hidden;
  if (inputs % tiles::kCodesPerLane != 0 || p.group_size < 1 ||
      inputs % p.group_size != 0) {
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
  plan.kernel = gate_up
      ? gate_up_kernel_name(p.activation, plan.variant, p.dtype, p.mode, p.bits,
                            p.group_size)
      : down_kernel_name(plan.variant, p.dtype, p.mode, p.bits, p.group_size);
  const TileShape tile = tile_shape(p.op, plan.variant, gated);
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

  // The Primitive's inputs in the order of expert_slots (ops/common.h):
  // x or h, weight, scales, [biases: affine], indices, [weights: down with
  // the combine], [bias], [global_scale], then [order: prefill]. Each kernel
  // declares every slot; an input the call lacks is bound as absent.
  const bool down = !gate_up;
  int next_input = 0;
  int slot = 0;
  auto in = [&](const char* name, bool present) {
    if (present) {
      plan.buffers.push_back({slot++, name, Source::input, next_input++});
    } else {
      plan.buffers.push_back({slot++, name, Source::absent, -1});
    }
  };
  const bool affine = p.mode == QuantMode::affine;
  in(gate_up ? "x" : "h", true);
  in(gate_up ? "gate_up_weight" : "down_weight", true);
  in(gate_up ? "gate_up_scales" : "down_scales", true);
  in(gate_up ? "gate_up_biases" : "down_biases", affine);
  in("indices", true);
  if (down) {
    in("weights", p.combine);
  }
  in("bias", p.bias);
  in("global_scale", p.global_scale);
  if (prefill) {
    in("order", true);
  }
  plan.buffers.push_back({slot++, gate_up ? "h" : "y", Source::output, 0});
  plan.buffers.push_back({slot++, "args", Source::args, -1});

  fused_moe_args::FusedMoeArgs a{};
  a.tokens = p.tokens;
  a.top_k = p.top_k;
  a.hidden = p.hidden;
  a.intermediate = p.intermediate;
  a.experts = p.experts;
  a.row_bytes = uint32_t(int64_t(inputs) * p.bits / 8); // of the rows this kernel reads
  a.groups_per_row = inputs / p.group_size;
  a.pairs = uint32_t(pairs);
  a.has_bias = p.bias;
  a.has_global_scale = p.global_scale;
  a.x_per_slot = gate_up && p.x_per_slot;
  a.combine = down && p.combine;
  if (gate_up) {
    a.limit = p.limit;
    a.alpha = p.alpha;
    a.beta = p.beta;
    a.linear_beta = p.linear_beta;
  }
  plan.args = as_bytes(a);
  return plan;
}

} // namespace fused_moe::metal
