#pragma once
#include <cstdint>
#include "m1/dtype.h"
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {m1::f32_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return m1::bf16_to_f32(h.x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {{m1::f32_to_bf16(a)}, {m1::f32_to_bf16(b)}}; }
inline float __low2float(__nv_bfloat162 v) { return m1::bf16_to_f32(v.x.x); }
inline float __high2float(__nv_bfloat162 v) { return m1::bf16_to_f32(v.y.x); }
// bf16 pair arithmetic, rounded once to nearest even: exact for products (two bf16 values multiply
// exactly in fp32) and for differences that fit fp32 (the kernels' uses).
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __floats2bfloat162_rn(__low2float(a) * __low2float(b), __high2float(a) * __high2float(b));
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __floats2bfloat162_rn(__low2float(a) - __low2float(b), __high2float(a) - __high2float(b));
}
