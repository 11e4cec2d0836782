#pragma once
// Kernels written as plain loops get one compiled copy per x86-64 level (AVX-512, AVX2, baseline),
// chosen once at load time by the CPU's features. Helpers they call must be inlined
// (M1_INLINE) so they are compiled for each level too.

#define M1_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define M1_INLINE inline __attribute__((always_inline))
