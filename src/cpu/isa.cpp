#include "cpu/isa.h"

#include <cpuid.h>

#include <cstdlib>
#include <string_view>

namespace m1::cpu {
namespace {

// CPUID leaf 1, ECX bit 29 (clang's __builtin_cpu_supports does not know "f16c").
bool has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

Isa detect_isa() {
  __builtin_cpu_init();
  const char* forced = std::getenv("M1_CPU_ISA");
  const std::string_view cap = forced ? forced : "";
  if (cap.empty() && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (cap != "scalar" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c())
    return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

bool cpu_bf16_dot() {
  static const bool available = cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return available;
}

}  // namespace m1::cpu
