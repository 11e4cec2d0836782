#pragma once
#include <cstdint>
#include "m1/dtype.h"
struct __half { uint16_t x; };
inline __half __ushort_as_half(uint16_t v) { return {v}; }
inline float __half2float(__half h) { return m1::f16_to_f32(h.x); }
