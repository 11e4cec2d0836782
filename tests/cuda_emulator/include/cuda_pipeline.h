#pragma once
// cp.async through the pipeline primitives: copies land at __pipeline_wait_prior (shim.h).
#include "shim.h"
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill = 0) { emu::copy_async(dst, src, size, zfill); }
inline void __pipeline_commit() { emu::copy_async_commit(); }
inline void __pipeline_wait_prior(int keep) { emu::copy_async_wait(keep); }
