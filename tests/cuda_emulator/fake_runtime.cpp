// Whole-backend CPU emulation, runtime side: the CUDA runtime API the backend and its tests call.
// Device memory is host memory (poisoned with 0xff bytes, NaN as floats, when allocated or freed).
// Streams are queues run lazily, at the points where the host would wait for them (stream/event/
// device synchronisation, a copy into pageable host memory), so host data changed before a queued
// copy ran shows; the legacy default stream runs at once. Stream capture records each launch,
// memcpy and memset as a closure replayed by cudaGraphLaunch; what real CUDA refuses during a
// capture (synchronising, pageable copies, stream-ordered allocation: graph memory nodes are not
// emulated) fails the call and invalidates the capture, and is logged to stderr.
#include <sys/mman.h>

#include <cstdarg>
#include <deque>
#include <numeric>
#include <random>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "shim.h"

namespace emu {
Fiber* cur = nullptr;
std::vector<Fiber> fibers;
Index block_idx, block_dim, grid_dim;
uint64_t block_generation = 0;

[[noreturn]] void die(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "EMU FATAL: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, " (block %u,%u,%u thread %u)\n", block_idx.x, block_idx.y, block_idx.z, cur ? cur->flat : 0u);
  va_end(args);
  std::abort();
}
static void note(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "EMU: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}

// --- Fibers -----------------------------------------------------------------------------------
extern "C" void emu_switch(void** save_sp, void* next_sp);
static void* main_sp = nullptr;
static std::function<void()>* current_body = nullptr;
static unsigned char* smem_base = nullptr;
static size_t smem_size = 0;
static std::vector<unsigned char> smem_storage;
constexpr size_t kStack = 256 * 1024;
static char* stacks = nullptr;

unsigned char* shared_mem() { return smem_base; }
size_t shared_size() { return smem_size; }

void yield(State s, int line) {
  cur->state = s;
  cur->line = line;
  emu_switch(&cur->sp, main_sp);
}

extern "C" void emu_fiber_entry() {
  try {
    (*current_body)();
  } catch (const std::exception& e) {
    die("exception inside a kernel: %s", e.what());
  }
  cur->state = kDone;
  emu_switch(&cur->sp, main_sp);
  std::abort();
}

static const char* state_name(State s) {
  return s == kReady ? "running" : s == kBlockBarrier ? "__syncthreads" : s == kWarpSync ? "warp collective" : "exited";
}

long kernels_run = 0;
static void run_kernel(const char* name, dim3 grid, dim3 block, size_t smem, std::function<void()>& body) {
  ++kernels_run;
  const unsigned threads = block.x * block.y * block.z;
  if (!stacks)
    stacks = static_cast<char*>(mmap(nullptr, kStack * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  fibers.assign(threads, Fiber{});
  smem_storage.assign(smem + 256, 0);
  smem_base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_storage.data()) + 127) & ~uintptr_t(127));
  smem_size = smem;
  current_body = &body;
  block_dim = {block.x, block.y, block.z};
  grid_dim = {grid.x, grid.y, grid.z};
  static const char* env = std::getenv("EMU_ORDER");
  static const std::string mode = env ? env : "forward";
  static std::mt19937 rng(12345);
  std::vector<unsigned> order(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        ++block_generation;
        std::memset(smem_base, 0xff, smem);
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          f.state = kReady;
          f.flat = t;
          f.idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          f.pending.clear();
          f.open_group = 0;
          f.stack = stacks + kStack * t;
          auto* top = reinterpret_cast<uint64_t*>(f.stack + kStack);
          top[-1] = 0;
          top[-2] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
          for (int r = 3; r <= 8; ++r) top[-r] = 0;
          f.sp = top - 8;
        }
        for (;;) {
          std::iota(order.begin(), order.end(), 0u);
          if (mode == "reverse") std::reverse(order.begin(), order.end());
          if (mode == "random") std::shuffle(order.begin(), order.end(), rng);
          for (unsigned t : order)
            if (fibers[t].state == kReady) {
              cur = &fibers[t];
              emu_switch(&main_sp, cur->sp);
            }
          cur = nullptr;
          unsigned done = 0;
          for (auto& f : fibers) done += f.state == kDone;
          if (done == threads) break;
          bool released = false;
          for (unsigned w = 0; w * 32 < threads; ++w) {
            const unsigned lo = w * 32, hi = std::min(threads, lo + 32);
            int line = INT32_MIN;
            unsigned waiting = 0;
            for (unsigned t = lo; t < hi; ++t)
              if (fibers[t].state == kWarpSync) ++waiting, line = fibers[t].line;
            if (!waiting) continue;
            for (unsigned t = lo; t < hi; ++t)
              if (fibers[t].state != kWarpSync || fibers[t].line != line)
                die("%s: warp collective at line %d, but lane %u is at %s line %d", name, line, t - lo,
                    state_name(fibers[t].state), fibers[t].line);
            for (unsigned t = lo; t < hi; ++t) {
              std::memcpy(fibers[t].published, fibers[t].slot, sizeof(fibers[t].slot));
              fibers[t].state = kReady;
            }
            released = true;
          }
          if (released) continue;
          int line = INT32_MIN;
          for (auto& f : fibers)
            if (f.state == kBlockBarrier) {
              if (line == INT32_MIN) line = f.line;
              if (f.line != line) die("%s: __syncthreads at lines %d and %d", name, line, f.line);
            }
          if (done) die("%s: __syncthreads at line %d after %u threads exited", name, line, done);
          for (auto& f : fibers) f.state = kReady;
        }
        for (auto& f : fibers)
          if (!f.pending.empty()) die("%s: thread %u exited with cp.async copies never waited for", name, f.flat);
      }
}

// --- Memory -----------------------------------------------------------------------------------
enum class Kind { kDevice, kPinned };
struct Allocation {
  size_t size;
  Kind kind;
};
static std::map<uintptr_t, Allocation> allocations;
static std::deque<std::pair<void*, size_t>> quarantine;  // freed blocks kept poisoned a while
static size_t quarantined = 0;

static size_t rounded(size_t n) { return (std::max<size_t>(n, 1) + 255) / 256 * 256; }
static const Allocation* find(const void* p, size_t n) {
  const auto at = reinterpret_cast<uintptr_t>(p);
  auto it = allocations.upper_bound(at);
  if (it == allocations.begin()) return nullptr;
  --it;
  if (at + n > it->first + it->second.size) return nullptr;
  return &it->second;
}
static bool is_device(const void* p, size_t n) {
  const Allocation* a = find(p, n);
  return a && a->kind == Kind::kDevice;
}
bool device_pointer(const void* p) { return is_device(p, 0); }
static bool is_pinned(const void* p, size_t n) {
  const Allocation* a = find(p, n);
  return a && a->kind == Kind::kPinned;
}
static void* allocate(size_t n, Kind kind) {
  const size_t size = rounded(n);
  void* p = std::aligned_alloc(256, size);
  std::memset(p, 0xff, size);
  allocations[reinterpret_cast<uintptr_t>(p)] = {size, kind};
  return p;
}
static void release(void* p) {
  auto it = allocations.find(reinterpret_cast<uintptr_t>(p));
  std::memset(p, 0xff, it->second.size);
  quarantine.emplace_back(p, it->second.size);
  quarantined += it->second.size;
  allocations.erase(it);
  while (quarantined > (size_t(1) << 30)) {
    std::free(quarantine.front().first);
    quarantined -= quarantine.front().second;
    quarantine.pop_front();
  }
}

// --- Streams, events, graphs -----------------------------------------------------------------
using Op = std::function<void()>;  // a queued launch, copy, memset or event
struct Capture {
  cudaStreamCaptureMode mode;
  bool invalidated = false;
  std::vector<Op> nodes;
};
}  // namespace emu

struct CUstream_st {
  bool blocking = true;
  bool destroyed = false;
  std::deque<emu::Op> queue;
  std::unique_ptr<emu::Capture> capture;
  std::map<size_t, std::vector<void*>> pool;  // stream-ordered frees, reused by this stream
};
struct CUevent_st {
  CUstream_st* stream = nullptr;
  bool done = true;
  bool captured = false;
};
struct CUgraph_st {
  std::shared_ptr<std::vector<emu::Op>> nodes;
};
struct CUgraphExec_st {
  std::shared_ptr<std::vector<emu::Op>> nodes;
};

namespace emu {
static cudaError_t last_error = cudaSuccess;
static std::set<CUstream_st*> streams;
static CUstream_st* capturing = nullptr;
long graph_execs_alive = 0, graphs_alive = 0;
long ops_run = 0, graph_launches = 0, captures_invalidated = 0;

static cudaError_t fail(cudaError_t e, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "EMU error %d: ", int(e));
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  last_error = e;
  return e;
}
static bool is_default(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread; }
static CUstream_st* checked(cudaStream_t s) {
  if (is_default(s)) return nullptr;
  if (!streams.count(s)) die("use of an unknown stream %p", static_cast<void*>(s));
  if (s->destroyed) die("use of a destroyed stream %p", static_cast<void*>(s));
  return s;
}
static void invalidate(const char* why) {
  if (capturing && !capturing->capture->invalidated) {
    capturing->capture->invalidated = true;
    ++captures_invalidated;
    note("capture invalidated: %s", why);
  }
}
static void flush(CUstream_st* s, const bool* until = nullptr) {
  while (!s->queue.empty() && !(until && *until)) {
    Op op = std::move(s->queue.front());
    s->queue.pop_front();
    ++ops_run;
    op();
  }
}
static void flush_blocking() {
  for (CUstream_st* s : streams)
    if (s->blocking && !s->destroyed) flush(s);
}
static void flush_all() {
  for (CUstream_st* s : streams)
    if (!s->destroyed) flush(s);
}
// Runs `op` in `stream`'s order: at once on the default stream, into the graph while capturing,
// else queued.
static void submit(cudaStream_t stream, Op op) {
  CUstream_st* s = checked(stream);
  if (!s) {
    flush_blocking();
    ++ops_run;
    op();
    return;
  }
  if (s->capture) {
    s->capture->nodes.push_back(std::move(op));
    return;
  }
  s->queue.push_back(std::move(op));
}
}  // namespace emu

// --- The API ----------------------------------------------------------------------------------
using namespace emu;

static std::map<const void*, int> allowed_shared;

void emu::enqueue_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, std::function<void()> body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads < 1 || threads > 1024 || block.z > 64) {
    fail(cudaErrorInvalidConfiguration, "launch with block %ux%ux%u", block.x, block.y, block.z);
    return;
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "launch with grid %ux%ux%u", grid.x, grid.y, grid.z);
    return;
  }
  size_t limit = 48 * 1024;
  if (auto it = allowed_shared.find(kernel); it != allowed_shared.end()) limit = std::max<size_t>(limit, size_t(it->second));
  if (smem > limit) {
    fail(cudaErrorInvalidValue, "launch with %zu bytes of dynamic shared memory, allowed %zu", smem, limit);
    return;
  }
  static long serial = 0;
  const std::string name = "kernel#" + std::to_string(serial++);
  auto shared_body = std::make_shared<std::function<void()>>(std::move(body));
  submit(stream, Op{[=] { run_kernel(name.c_str(), grid, block, smem, *shared_body); }});
}

extern "C" {
cudaError_t cudaGetDeviceCount(int* n) {
  if (std::getenv("EMU_NO_DEVICE")) {
    *n = 0;
    last_error = cudaErrorNoDevice;
    return cudaErrorNoDevice;
  }
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "cudaSetDevice(%d)", d); }
static int sms() {
  const char* env = std::getenv("EMU_SMS");
  return env ? std::atoi(env) : 132;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = sms();
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = 227 * 1024;
  else die("cudaDeviceGetAttribute(%d) not emulated", int(attr));
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof(*p));
  std::strcpy(p->name, "Emulated H100");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = sms();
  p->sharedMemPerBlockOptin = 227 * 1024;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) die("cudaFuncSetAttribute(%d) not emulated", int(attr));
  if (value > 227 * 1024) return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: %d bytes of shared memory", value);
  allowed_shared[f] = value;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return last_error; }
const char* cudaGetErrorName(cudaError_t e) {
  static std::string s;
  s = "cudaError#" + std::to_string(int(e));
  return s.c_str();
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "emulated error";
  }
}

cudaError_t cudaMalloc(void** p, size_t n) {
  if (capturing && capturing->capture->mode == cudaStreamCaptureModeGlobal) {
    invalidate("cudaMalloc");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaMalloc during a global-mode capture");
  }
  *p = allocate(n, Kind::kDevice);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  if (capturing) {
    invalidate("cudaFree");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaFree during a capture");
  }
  if (!is_device(p, 1) || !allocations.count(reinterpret_cast<uintptr_t>(p))) return fail(cudaErrorInvalidValue, "cudaFree(%p): not an allocation", p);
  flush_all();  // cudaFree waits for the device
  release(p);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    invalidate("cudaMallocAsync");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaMallocAsync during a capture (graph memory nodes are not emulated)");
  }
  if (s) {
    auto& free_blocks = s->pool[rounded(n)];
    if (!free_blocks.empty()) {
      *p = free_blocks.back();
      free_blocks.pop_back();
      allocations[reinterpret_cast<uintptr_t>(*p)] = {rounded(n), Kind::kDevice};
      return cudaSuccess;
    }
  }
  *p = allocate(n, Kind::kDevice);
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  if (!p) return cudaSuccess;
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    invalidate("cudaFreeAsync");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaFreeAsync during a capture (graph memory nodes are not emulated)");
  }
  auto it = allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == allocations.end() || it->second.kind != Kind::kDevice) return fail(cudaErrorInvalidValue, "cudaFreeAsync(%p): not an allocation", p);
  const size_t size = it->second.size;
  allocations.erase(it);
  // Poisoned in stream order; the block is this stream's to reuse at once (as a pool would).
  submit(stream, Op{[p, size] { std::memset(p, 0xff, size); }});
  if (s) s->pool[size].push_back(p);
  else quarantine.emplace_back(p, size);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned int) {
  *p = allocate(n, Kind::kPinned);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  if (!is_pinned(p, 1)) return fail(cudaErrorInvalidValue, "cudaFreeHost(%p): not pinned memory", p);
  flush_all();
  auto it = allocations.find(reinterpret_cast<uintptr_t>(p));
  std::memset(p, 0xff, it->second.size);
  allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}

static cudaError_t check_copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  const bool dst_device = is_device(dst, n), src_device = is_device(src, n);
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dst_device && !src_device; break;
    case cudaMemcpyDeviceToHost: ok = !dst_device && src_device; break;
    case cudaMemcpyDeviceToDevice: ok = dst_device && src_device; break;
    case cudaMemcpyDefault: ok = true; break;
    default: ok = !dst_device && !src_device; break;
  }
  if (!ok) {
    die("memcpy of %zu bytes, kind %d, from %p (%s) to %p (%s)", n, int(kind), src, src_device ? "device" : "host", dst,
        dst_device ? "device" : "host");
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  if (capturing && capturing->capture->mode == cudaStreamCaptureModeGlobal) {
    invalidate("cudaMemcpy");
    return fail(cudaErrorStreamCaptureImplicit, "cudaMemcpy during a global-mode capture");
  }
  if (n == 0) return cudaSuccess;
  check_copy(dst, src, n, kind);
  flush_blocking();
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (n == 0) return cudaSuccess;
  check_copy(dst, src, n, kind);
  const bool host_src = !is_device(src, n), host_dst = !is_device(dst, n);
  const bool pageable_src = host_src && !is_pinned(src, n), pageable_dst = host_dst && !is_pinned(dst, n);
  if (s && s->capture && (pageable_src || pageable_dst)) {
    invalidate("pageable cudaMemcpyAsync");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaMemcpyAsync with pageable host memory during a capture");
  }
  if (!s) {
    std::memcpy(dst, src, n);
    return cudaSuccess;
  }
  if (pageable_src && !s->capture) {
    // Staged before the call returns: the caller may reuse its buffer at once.
    auto copy = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                             static_cast<const unsigned char*>(src) + n);
    submit(stream, Op{[dst, copy] { std::memcpy(dst, copy->data(), copy->size()); }});
    return cudaSuccess;
  }
  bool done = false;
  auto* flag = pageable_dst ? &done : nullptr;
  submit(stream, Op{[dst, src, n, flag] {
                      std::memcpy(dst, src, n);
                      if (flag) *flag = true;
                    }});
  if (pageable_dst) flush(s, &done);  // returns once the copy has landed
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (!is_device(p, n)) die("cudaMemset outside device memory");
  flush_blocking();
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t stream) {
  if (n && !is_device(p, n)) die("cudaMemsetAsync outside device memory");
  submit(stream, Op{[p, v, n] { std::memset(p, v, n); }});
  return cudaSuccess;
}

cudaError_t cudaMemset2DAsync(void* p, size_t pitch, int v, size_t width, size_t height, cudaStream_t stream) {
  if (height && !is_device(p, pitch * (height - 1) + width)) die("cudaMemset2DAsync outside device memory");
  if (width > pitch) return fail(cudaErrorInvalidValue, "cudaMemset2DAsync: width %zu over pitch %zu", width, pitch);
  submit(stream, Op{[=] {
                      for (size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(p) + r * pitch, v, width);
                    }});
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  auto* s = new CUstream_st;
  s->blocking = !(flags & cudaStreamNonBlocking);
  streams.insert(s);
  *stream = s;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of a default stream");
  if (s->capture) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamDestroy while capturing");
  flush(s);
  s->destroyed = true;  // kept, so a later use is caught
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    invalidate("cudaStreamSynchronize");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize of a capturing stream");
  }
  if (s) flush(s);
  else flush_blocking();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  if (capturing) {
    invalidate("cudaDeviceSynchronize");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaDeviceSynchronize during a capture");
  }
  flush_all();
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    e->captured = true;
    e->stream = s;
    return cudaSuccess;
  }
  e->captured = false;
  e->stream = s;
  e->done = false;
  submit(stream, Op{[e] { e->done = true; }});
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (e->captured && capturing) {
    invalidate("cudaEventSynchronize");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaEventSynchronize of an event recorded in the capture");
  }
  if (e->stream && !e->done) flush(e->stream, &e->done);
  if (!e->done) die("cudaEventSynchronize: the event never completed");
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  CUstream_st* s = checked(stream);
  if (!s) return fail(cudaErrorStreamCaptureUnsupported, "capture of a default stream");
  if (capturing) return fail(cudaErrorIllegalState, "a second capture while one is in progress (not emulated)");
  s->capture = std::make_unique<Capture>();
  s->capture->mode = mode;
  capturing = s;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  CUstream_st* s = checked(stream);
  *graph = nullptr;
  if (!s || !s->capture) return fail(cudaErrorIllegalState, "cudaStreamEndCapture of a stream not capturing");
  std::unique_ptr<Capture> capture = std::move(s->capture);
  capturing = nullptr;
  if (capture->invalidated) return fail(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture of an invalidated capture");
  *graph = new CUgraph_st{std::make_shared<std::vector<Op>>(std::move(capture->nodes))};
  ++graphs_alive;
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  CUstream_st* s = checked(stream);
  *status = s && s->capture ? (s->capture->invalidated ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive)
                            : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (!graph) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate of a null graph");
  *exec = new CUgraphExec_st{std::make_shared<std::vector<Op>>(*graph->nodes)};
  ++graph_execs_alive;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  if (!graph) return fail(cudaErrorInvalidValue, "cudaGraphDestroy(null)");
  delete graph;
  --graphs_alive;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (!exec) return fail(cudaErrorInvalidValue, "cudaGraphExecDestroy(null)");
  delete exec;
  --graph_execs_alive;
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  CUstream_st* s = checked(stream);
  if (s && s->capture) die("cudaGraphLaunch into a capture (not emulated)");
  auto nodes = exec->nodes;
  submit(stream, Op{[nodes] {
                      ++graph_launches;
                      for (const Op& op : *nodes) op();
                    }});
  return cudaSuccess;
}
}  // extern "C"

// A summary at exit, so a run shows what the emulation did.
static struct Summary {
  ~Summary() {
    if (std::getenv("EMU_QUIET")) return;
    std::fprintf(stderr, "EMU summary: %ld kernels, %ld stream ops, %ld graph launches, %ld captures invalidated, %ld graph execs and %ld graphs alive\n",
                 kernels_run, ops_run, graph_launches, captures_invalidated, graph_execs_alive, graphs_alive);
  }
} summary;
