#pragma once
// The instruction set the CPU kernels run on, chosen once per process: the best the CPU offers,
// or a lesser one named by M1_CPU_ISA ("avx2" or "scalar"), so tests cover every path.

namespace m1::cpu {

enum class Isa { kAvx512, kAvx2, kScalar };

Isa cpu_isa();
// AVX-512 BF16 dot products (vdpbf16ps) on the AVX-512 path.
bool cpu_bf16_dot();

}  // namespace m1::cpu
