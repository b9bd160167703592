#include "cpu/isa.h"

#include <cstdlib>
#include <stdexcept>

namespace fused_moe::cpu {

namespace {

struct Level {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

#if defined(FUSED_MOE_X86)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
}
#endif
bool always() {
  return true;
}

// Best first.
const std::vector<Level>& levels() {
  static const std::vector<Level> l = {
#if defined(FUSED_MOE_X86)
      {"avx512", &kernels_avx512, &has_avx512},
      {"avx2", &kernels_avx2, &has_avx2},
#endif
      {"generic", &kernels_generic, &always},
  };
  return l;
}

const KernelTable& choose() {
  const char* forced = std::getenv("FUSED_MOE_ISA");
  std::string known;
  for (const auto& level : levels()) {
    known += (known.empty() ? "" : ", ") + std::string(level.name);
    if (forced && std::string(forced) != level.name) {
      continue;
    }
    if (!level.supported()) {
      if (forced) {
        throw std::runtime_error(
            std::string("FUSED_MOE_ISA=") + forced +
            " but this CPU does not support it");
      }
      continue;
    }
    return level.table();
  }
  throw std::runtime_error(
      std::string("FUSED_MOE_ISA=") + (forced ? forced : "") +
      " is not a CPU level of this build; expected one of: " + known);
}

} // namespace

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& level : levels()) {
    if (level.supported()) {
      names.push_back(level.name);
    }
  }
  return names;
}

} // namespace fused_moe::cpu
