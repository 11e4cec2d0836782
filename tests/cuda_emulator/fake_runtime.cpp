// Whole-backend CPU emulation, runtime side: the CUDA runtime API the backend and its tests call.
// Device memory is host memory (poisoned with 0xff bytes, NaN as floats, when allocated or freed).
// Streams are queues run lazily, at the points where the host would wait for them (stream/event/
// device synchronisation, a copy into pageable host memory), so host data changed before a queued
// copy ran shows; the legacy default stream runs at once. Stream capture records each launch,
// memcpy and memset as a closure replayed by cudaGraphLaunch; what real CUDA refuses during a
// capture (synchronising, pageable copies, stream-ordered allocation: graph memory nodes are not
// emulated) fails the call and invalidates the capture, and is logged to stderr.
//
// Several host threads may use it at once, as the ranks of a tensor-parallel group do: each runs
// the work of the streams it waits for on fibers of its own (the kernel-side state is per thread),
// so kernels of different streams run concurrently and may wait for each other, as a collective's
// barrier does (its waiting threads pause with __nanosleep). One lock keeps the runtime's books and
// is never held while a stream's work runs. EMU_DEVICES=N emulates N GPUs (default 1), with a
// current device per thread, peer access between them, and shared-memory opt-ins per device.
#include <sys/mman.h>
#include <unistd.h>
#include <sched.h>

#include <cstdarg>
#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <thread>
#include <numeric>
#include <random>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "shim.h"

namespace emu {
thread_local Fiber* cur = nullptr;
thread_local std::vector<Fiber> fibers;
thread_local Index block_idx, block_dim, grid_dim;
thread_local uint64_t block_generation = 0;

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
static thread_local void* main_sp = nullptr;
static thread_local std::function<void()>* current_body = nullptr;
static thread_local unsigned char* smem_base = nullptr;
static thread_local size_t smem_size = 0;
// Dynamic shared memory ends where a guard page begins, so a kernel that reads or writes past
// what its launch asked for (by 128 bytes or more: the base is 128-byte aligned) faults at once
// instead of touching the host's heap.
constexpr size_t kSharedArena = 256 * 1024;
struct SharedArena {
  unsigned char* base = nullptr;
  size_t page = 0;
  unsigned char* guard() {
    if (!base) {
      page = size_t(sysconf(_SC_PAGESIZE));
      void* p = mmap(nullptr, kSharedArena + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) die("cannot map the shared-memory arena");
      base = static_cast<unsigned char*>(p);
      if (mprotect(base + kSharedArena, page, PROT_NONE) != 0) die("cannot protect the shared-memory guard page");
    }
    return base + kSharedArena;
  }
  ~SharedArena() {
    if (base) munmap(base, kSharedArena + page);
  }
};
static thread_local SharedArena shared_arena;
constexpr size_t kStack = 256 * 1024;
// Each fiber's stack starts below the top of its slot by a per-fiber offset, a multiple of 64
// bytes under 64 KB: with tops all 256 KB apart, the 1024 fibers' hot stack lines would share a
// handful of cache sets and miss on every switch. The offsets of fibers 0..1023 are distinct.
constexpr size_t kStackColour = 576, kStackColours = 64 * 1024;
static_assert(kStackColours < kStack / 2, "a fiber keeps at least half its slot");
// Each thread's fiber stacks, mapped on its first kernel and unmapped when it ends.
struct Stacks {
  char* base = nullptr;
  ~Stacks() {
    if (base) munmap(base, kStack * 1024);
  }
};
static thread_local Stacks stacks;

bool eager_copies() {
  static const bool eager = [] {
    const char* mode = std::getenv("EMU_COPIES");
    if (!mode || std::string(mode) == "deferred") return false;
    if (std::string(mode) == "eager") return true;
    die("EMU_COPIES must be deferred or eager, got %s", mode);
  }();
  return eager;
}

unsigned char* shared_mem() { return smem_base; }
size_t shared_size() { return smem_size; }

// This thread's outputs of a warpgroup product: warp w of its warpgroup, lane 4 g + t, holds rows
// 16 w + g and + 8 of columns 8 i + 2 t and + 1; each is its input (or 0) plus the 16 exact products
// in k order, rounded toward zero once, as mma_m16n8k16 sums them.
void warpgroup_product(const PendingMma& op, const float* in, float* out) {
  const unsigned w = (cur->flat % 128) / 32, g = lane() / 4, t = lane() % 4;
  double a_rows[2][16];
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 16; ++k)
      a_rows[r][k] = op.a_in_registers ? op.a_rows[r][k] : descriptor_element(op.a, int(16 * w + g + 8 * r), k);
  for (int i = 0; i < op.n / 8; ++i) {
    double b_columns[2][16];
    for (int c = 0; c < 2; ++c)
      for (int k = 0; k < 16; ++k) b_columns[c][k] = descriptor_element(op.b, int(8 * i + 2 * t + c), k, op.b_mn_major);
    for (int e = 0; e < 4; ++e) {
      double sum = op.accumulate ? in[4 * i + e] : 0.0;
      for (int k = 0; k < 16; ++k) sum += a_rows[e >> 1][k] * b_columns[e & 1][k];
      out[4 * i + e] = tensor_core_round(sum);
    }
  }
}

void warpgroup_wait(int keep) {
  yield(kWarpSync, -5);
  const int limit = cur->mma_group - keep;
  auto& pending = cur->pending_mma;
  size_t kept = 0;
  for (auto& op : pending) {
    if (op.group >= limit) {
      pending[kept++] = op;
      continue;
    }
    if (eager_copies()) {
      float again[256];
      warpgroup_product(op, op.d, again);
      if (std::memcmp(again, op.result, sizeof(float) * op.n / 2) != 0)
        die("thread %u: a wgmma's operands or accumulators changed between its issue and its wait", cur->flat);
    }
    std::memcpy(op.d, op.result, sizeof(float) * op.n / 2);
  }
  pending.resize(kept);
}

// A round runs each fiber that is ready when the round reaches it, once, in the round's order. A
// fiber that yields switches straight to the next such fiber (one switch, not two through the
// scheduler), and the last one of the round back to the scheduler.
struct Round {
  const unsigned* order = nullptr;
  size_t next = 0, size = 0;
  bool progressed = false;  // a fiber did more than poll
  bool ready = false;       // a fiber yielded still ready to run
};
static thread_local Round round;

// The round's next ready fiber, made current; null when the round is over.
static Fiber* start_next() {
  while (round.next < round.size) {
    Fiber& f = fibers[round.order[round.next++]];
    if (f.state != kReady) continue;
    f.paused = false;
    cur = &f;
    return &f;
  }
  cur = nullptr;
  return nullptr;
}

// Leaves the current fiber, which has set its state, for the next of the round.
static void leave() {
  Fiber* from = cur;
  round.progressed = round.progressed || !from->paused;
  round.ready = round.ready || from->state == kReady;
  Fiber* next = start_next();
  emu_switch(&from->sp, next ? next->sp : main_sp);
}

void yield(State s, int line) {
  cur->state = s;
  cur->line = line;
  leave();
}

// Named barriers: the threads that arrived (bar.arrive) at each id in the current phase, and the
// count they gave. Id 0 is __syncthreads'.
constexpr int kNamedBarriers = 16;
struct Arrivals { int threads = 0, count = 0; };
static thread_local Arrivals arrivals[kNamedBarriers];

static void check_barrier(int id, int threads) {
  if (id < 1 || id >= kNamedBarriers) die("named barrier id %d outside 1..%d", id, kNamedBarriers - 1);
  if (threads < 32 || threads % 32 || unsigned(threads) > fibers.size())
    die("named barrier %d: thread count %d is not a multiple of 32 up to the block's %zu", id, threads, fibers.size());
  Arrivals& a = arrivals[id];
  if (a.threads && a.count != threads) die("named barrier %d used with counts %d and %d in one phase", id, a.count, threads);
}
void named_barrier_sync(int id, int threads, int line) {
  check_barrier(id, threads);
  cur->barrier = id;
  cur->barrier_threads = threads;
  yield(kNamedBarrier, line);
}
// The arriving thread then lets the others run, so that the threads it releases may run before
// its next step, as they may on a GPU.
void named_barrier_arrive(int id, int threads, int line) {
  check_barrier(id, threads);
  arrivals[id].count = threads;
  ++arrivals[id].threads;
  yield(kReady, line);
}

// Releases each named barrier whose waiting and arrived threads make its count; a phase that
// gets more threads than its count is a kernel's error.
static bool release_named_barriers(const char* name) {
  int waiting[kNamedBarriers] = {}, threads[kNamedBarriers] = {};
  for (auto& f : fibers)
    if (f.state == kNamedBarrier) {
      const int id = f.barrier;
      if (waiting[id] && f.barrier_threads != threads[id])
        die("%s: named barrier %d waited on with counts %d and %d", name, id, threads[id], f.barrier_threads);
      threads[id] = f.barrier_threads, ++waiting[id];
    }
  bool release[kNamedBarriers] = {}, released = false;
  for (int id = 1; id < kNamedBarriers; ++id) {
    if (!waiting[id]) continue;
    Arrivals& a = arrivals[id];
    if (a.threads && a.count != threads[id]) die("%s: named barrier %d: counts %d and %d", name, id, a.count, threads[id]);
    if (waiting[id] + a.threads > threads[id])
      die("%s: named barrier %d has %d threads waiting and %d arrived for a count of %d", name, id, waiting[id],
          a.threads, threads[id]);
    if (waiting[id] + a.threads < threads[id]) continue;
    a = {};
    release[id] = released = true;
  }
  if (released)
    for (auto& f : fibers)
      if (f.state == kNamedBarrier && release[f.barrier]) f.state = kReady;
  return released;
}

static const char* state_name(State s) {
  return s == kReady            ? "running"
         : s == kBlockBarrier    ? "__syncthreads"
         : s == kNamedBarrier    ? "a named barrier"
         : s == kWarpSync        ? "warp collective"
                                 : "exited";
}

// Releases each warp whose live lanes all wait at the same collective. Strict (when no thread can
// run on and nothing was released), a warp with some lanes at a collective and others elsewhere
// is a kernel's error.
static bool release_warps(const char* name, bool strict) {
  bool released = false;
  const unsigned threads = unsigned(fibers.size());
  for (unsigned w = 0; w * 32 < threads; ++w) {
    const unsigned lo = w * 32, hi = std::min(threads, lo + 32);
    int line = INT32_MIN;
    unsigned waiting = 0;
    for (unsigned t = lo; t < hi; ++t)
      if (fibers[t].state == kWarpSync) ++waiting, line = fibers[t].line;
    if (!waiting) continue;
    bool whole = true;
    for (unsigned t = lo; t < hi; ++t)
      if (fibers[t].state != kWarpSync || fibers[t].line != line) {
        if (strict)
          die("%s: warp collective at line %d, but lane %u is at %s line %d", name, line, t - lo,
              state_name(fibers[t].state), fibers[t].line);
        whole = false;
      }
    if (!whole) continue;
    for (unsigned t = lo; t < hi; ++t) {
      std::memcpy(fibers[t].published, fibers[t].slot, sizeof(fibers[t].slot));
      fibers[t].state = kReady;
    }
    released = true;
  }
  return released;
}

// A thread polling memory another stream writes: the other fibers of its block run meanwhile,
// and when every live fiber of the block only polls, the host thread lets others run.
void pause(int line) {
  cur->paused = true;
  yield(kReady, line);
}

extern "C" void emu_fiber_entry() {
  try {
    (*current_body)();
  } catch (const std::exception& e) {
    die("exception inside a kernel: %s", e.what());
  }
  cur->state = kDone;
  leave();
  std::abort();
}


std::atomic<long> kernels_run{0};
static void run_kernel(const char* name, dim3 grid, dim3 block, size_t smem, std::function<void()>& body) {
  ++kernels_run;
  const unsigned threads = block.x * block.y * block.z;
  if (!stacks.base)
    stacks.base = static_cast<char*>(mmap(nullptr, kStack * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  fibers.assign(threads, Fiber{});
  std::vector<Fiber>& fs = fibers;  // the thread-local's address, looked up once
  if (smem > kSharedArena) die("%s: %zu bytes of dynamic shared memory, more than any GPU has", name, smem);
  smem_base = shared_arena.guard() - (smem + 127) / 128 * 128;
  smem_size = smem;
  current_body = &body;
  block_dim = {block.x, block.y, block.z};
  grid_dim = {grid.x, grid.y, grid.z};
  static const char* env = std::getenv("EMU_ORDER");
  static const std::string mode = env ? env : "forward";
  if (mode != "forward" && mode != "reverse" && mode != "random" && mode != "skew")
    die("EMU_ORDER must be forward, reverse, random or skew, got %s", mode.c_str());
  static std::mt19937 rng(12345);
  // The order blocks run in (EMU_BLOCKS): launch order, its reverse, or shuffled. A GPU promises
  // none, so a kernel whose blocks meet (the last to arrive folds the others' partials) must give
  // the same bits in any, and no block may wait for one launched after it.
  static const char* blocks_env = std::getenv("EMU_BLOCKS");
  static const std::string blocks_mode = blocks_env ? blocks_env : "forward";
  if (blocks_mode != "forward" && blocks_mode != "reverse" && blocks_mode != "random")
    die("EMU_BLOCKS must be forward, reverse or random, got %s", blocks_mode.c_str());
  thread_local std::mt19937 block_rng(54321);
  std::vector<unsigned> blocks(size_t(grid.x) * grid.y * grid.z);
  std::iota(blocks.begin(), blocks.end(), 0u);
  if (blocks_mode == "reverse") std::reverse(blocks.begin(), blocks.end());
  if (blocks_mode == "random") std::shuffle(blocks.begin(), blocks.end(), block_rng);
  std::vector<unsigned> order(threads);
  for (const unsigned b : blocks) {
    block_idx = {b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
    ++block_generation;
    std::memset(smem_base, 0xff, smem);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f.state = kReady;
      f.flat = t;
      f.idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      f.pending.clear();
      f.open_group = 0;
      f.pending_mma.clear();
      f.mma_group = 0;
      f.stack = stacks.base + kStack * t;
      auto* top = reinterpret_cast<uint64_t*>(f.stack + kStack - t * kStackColour % kStackColours);
      top[-1] = 0;
      top[-2] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
      for (int r = 3; r <= 8; ++r) top[-r] = 0;
      f.sp = top - 8;
    }
    for (unsigned rounds = 1;; ++rounds) {
      std::iota(order.begin(), order.end(), 0u);
      if (mode == "reverse") std::reverse(order.begin(), order.end());
      if (mode == "random") std::shuffle(order.begin(), order.end(), rng);
      size_t size = order.size();
      bool skipped_ready = false;
      if (mode == "skew") {
        // Warp w runs every (1 + w % 4)th round: warps drift apart between barriers, as a GPU's
        // may, so a stage refilled while a slower warp still reads it shows.
        size = 0;
        for (unsigned t = 0; t < threads; ++t) {
          if (rounds % (1 + (t / 32) % 4) == 0)
            order[size++] = t;
          else
            skipped_ready = skipped_ready || fs[t].state == kReady;
        }
      }
      round = {order.data(), 0, size};
      round.ready = skipped_ready;
      if (Fiber* first = start_next()) emu_switch(&main_sp, first->sp);
      const bool progressed = round.progressed, ready = round.ready;  // start_next left cur null
      unsigned done = 0;
      bool at_named = false, at_warp = false;
      for (auto& f : fs) {
        done += f.state == kDone;
        at_named = at_named || f.state == kNamedBarrier;
        at_warp = at_warp || f.state == kWarpSync;
      }
      if (done == threads) break;
      // Warp collectives and named barriers release as soon as their threads are there, while
      // other threads run on, as they may on a GPU.
      const bool named = at_named && release_named_barriers(name);
      const bool warps = at_warp && release_warps(name, false);
      if (ready || named || warps) {  // paused fibers poll again; __syncthreads waits until none is paused
        if (!progressed && !named && !warps) sched_yield();
        continue;
      }
      // Nothing runs and nothing was released: a warp split between a collective and anywhere
      // else can never release, which this reports.
      release_warps(name, true);
      for (auto& f : fibers)
        if (f.state == kNamedBarrier)
          die("%s: deadlock: thread %u waits at named barrier %d (count %d, %d arrived) and nothing can be released",
              name, f.flat, f.barrier, f.barrier_threads, arrivals[f.barrier].threads);
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
      else if (!f.pending_mma.empty()) die("%s: thread %u exited with wgmma products never waited for", name, f.flat);
    for (int id = 1; id < kNamedBarriers; ++id)
      if (arrivals[id].threads)
        die("%s: %d threads arrived at named barrier %d and no phase completed it", name, arrivals[id].threads, id);
  }
}

// --- Memory -----------------------------------------------------------------------------------
// The runtime's books (allocations, streams, queues, opt-ins). Recursive: API calls nest.
static std::recursive_mutex books;
using Lock = std::unique_lock<std::recursive_mutex>;
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
  std::vector<cudaGraphNodeType> kinds;  // each node's, for cudaGraphGetNodes
};
}  // namespace emu

struct CUstream_st {
  std::mutex running;  // held by the thread running this stream's work, so it runs in order
  bool blocking = true;
  bool destroyed = false;
  std::deque<emu::Op> queue;
  std::unique_ptr<emu::Capture> capture;
  std::map<size_t, std::vector<void*>> pool;  // stream-ordered frees, reused by this stream
};
struct CUevent_st {
  CUstream_st* stream = nullptr;
  std::atomic<bool> done{true};
  bool captured = false;
  std::chrono::steady_clock::time_point when;  // host time the emulation reached it
};
struct CUgraphNode_st {
  cudaGraphNodeType kind;
};
struct CUgraph_st {
  std::shared_ptr<std::vector<emu::Op>> nodes;
  std::vector<CUgraphNode_st> kinds;  // what cudaGraphGetNodes hands out, one per node
};
struct CUgraphExec_st {
  std::shared_ptr<std::vector<emu::Op>> nodes;
};

namespace emu {
static thread_local cudaError_t last_error = cudaSuccess;
static std::set<CUstream_st*> streams;
static thread_local CUstream_st* capturing = nullptr;  // captures are per thread (as in relaxed mode)
static std::atomic<int> global_captures{0};           // a global-mode capture refuses every thread's allocations
static thread_local int current_device = 0;
std::atomic<long> graph_execs_alive{0}, graphs_alive{0};
std::atomic<long> ops_run{0}, graph_launches{0}, captures_invalidated{0};

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
// Runs the stream's queued work (until `*until`), one op at a time, without the books' lock.
static void flush(CUstream_st* s, const std::atomic<bool>* until = nullptr) {
  std::lock_guard running(s->running);
  for (;;) {
    Op op;
    {
      Lock lock(books);
      if (s->queue.empty() || (until && until->load())) return;
      op = std::move(s->queue.front());
      s->queue.pop_front();
    }
    ++ops_run;
    op();
  }
}
// Runs the work of every stream `which` picks, the streams side by side (as the GPU runs them:
// one stream's kernel may wait for another's).
template <class Which>
static void flush_streams(Which which) {
  std::vector<CUstream_st*> pending;
  {
    Lock lock(books);
    for (CUstream_st* s : streams)
      if (!s->destroyed && !s->queue.empty() && which(s)) pending.push_back(s);
  }
  if (pending.size() == 1) return flush(pending.front());
  std::vector<std::thread> threads;
  for (CUstream_st* s : pending) threads.emplace_back([s] { flush(s); });
  for (auto& t : threads) t.join();
}
static void flush_blocking() {
  flush_streams([](CUstream_st* s) { return s->blocking; });
}
static void flush_all() {
  flush_streams([](CUstream_st*) { return true; });
}
// Runs `op` in `stream`'s order: at once on the default stream, into the graph while capturing,
// else queued.
static void submit(cudaStream_t stream, Op op, cudaGraphNodeType kind) {
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (!s) {
    lock.unlock();
    flush_blocking();
    ++ops_run;
    op();
    return;
  }
  if (s->capture) {
    s->capture->nodes.push_back(std::move(op));
    s->capture->kinds.push_back(kind);
    return;
  }
  s->queue.push_back(std::move(op));
}
}  // namespace emu

// --- The API ----------------------------------------------------------------------------------
using namespace emu;

static std::map<std::pair<int, const void*>, int> allowed_shared;  // per device and kernel

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
  Lock lock(books);
  if (auto it = allowed_shared.find({current_device, kernel}); it != allowed_shared.end())
    limit = std::max<size_t>(limit, size_t(it->second));
  if (smem > limit) {
    fail(cudaErrorInvalidValue, "launch with %zu bytes of dynamic shared memory, allowed %zu", smem, limit);
    return;
  }
  static std::atomic<long> serial{0};
  const std::string name = "kernel#" + std::to_string(serial++);
  lock.unlock();
  auto shared_body = std::make_shared<std::function<void()>>(std::move(body));
  submit(stream, Op{[=] { run_kernel(name.c_str(), grid, block, smem, *shared_body); }}, cudaGraphNodeTypeKernel);
}

extern "C" {
static int device_count() {
  if (std::getenv("EMU_NO_DEVICE")) return 0;
  const char* env = std::getenv("EMU_DEVICES");
  return env ? std::max(1, std::atoi(env)) : 1;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = device_count();
  if (*n == 0) {
    last_error = cudaErrorNoDevice;
    return cudaErrorNoDevice;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) { *d = current_device; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= device_count()) return fail(cudaErrorInvalidDevice, "cudaSetDevice(%d)", d);
  current_device = d;
  return cudaSuccess;
}
static std::set<std::pair<int, int>> peer_access;  // (device, peer) enabled
cudaError_t cudaDeviceCanAccessPeer(int* can, int device, int peer) {
  const int n = device_count();
  if (device < 0 || device >= n || peer < 0 || peer >= n) return fail(cudaErrorInvalidDevice, "cudaDeviceCanAccessPeer(%d, %d)", device, peer);
  *can = device != peer;
  return cudaSuccess;
}
cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned int) {
  if (peer < 0 || peer >= device_count() || peer == current_device)
    return fail(cudaErrorInvalidDevice, "cudaDeviceEnablePeerAccess(%d) from device %d", peer, current_device);
  Lock lock(books);
  if (!peer_access.insert({current_device, peer}).second) {
    last_error = cudaErrorPeerAccessAlreadyEnabled;
    return cudaErrorPeerAccessAlreadyEnabled;
  }
  return cudaSuccess;
}
static int sms() {
  const char* env = std::getenv("EMU_SMS");
  return env ? std::atoi(env) : 132;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute on device %d", device);
  if (attr == cudaDevAttrMultiProcessorCount) *value = sms();
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = 227 * 1024;
  else if (attr == cudaDevAttrComputeCapabilityMajor) *value = 9;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = 0;
  else die("cudaDeviceGetAttribute(%d) not emulated", int(attr));
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties(%d)", device);
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
  Lock lock(books);
  allowed_shared[{current_device, f}] = value;
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
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "emulated error";
  }
}

cudaError_t cudaMalloc(void** p, size_t n) {
  Lock lock(books);
  if (global_captures.load() > 0) {
    invalidate("cudaMalloc");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaMalloc during a global-mode capture");
  }
  *p = allocate(n, Kind::kDevice);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  Lock lock(books);
  if (capturing) {
    invalidate("cudaFree");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaFree during a capture");
  }
  if (!is_device(p, 1) || !allocations.count(reinterpret_cast<uintptr_t>(p))) return fail(cudaErrorInvalidValue, "cudaFree(%p): not an allocation", p);
  lock.unlock();
  flush_all();  // cudaFree waits for the device
  lock.lock();
  release(p);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t stream) {
  Lock lock(books);
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
  Lock lock(books);
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
  if (s) s->pool[size].push_back(p);
  else quarantine.emplace_back(p, size);
  lock.unlock();
  submit(stream, Op{[p, size] { std::memset(p, 0xff, size); }}, cudaGraphNodeTypeMemFree);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned int) {
  Lock lock(books);
  *p = allocate(n, Kind::kPinned);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  Lock lock(books);
  if (!is_pinned(p, 1)) return fail(cudaErrorInvalidValue, "cudaFreeHost(%p): not pinned memory", p);
  lock.unlock();
  flush_all();
  lock.lock();
  auto it = allocations.find(reinterpret_cast<uintptr_t>(p));
  std::memset(p, 0xff, it->second.size);
  allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}

static cudaError_t check_copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  Lock lock(books);
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
  if (global_captures.load() > 0) {
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
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (n == 0) return cudaSuccess;
  check_copy(dst, src, n, kind);
  const bool host_src = !is_device(src, n), host_dst = !is_device(dst, n);
  const bool pageable_src = host_src && !is_pinned(src, n), pageable_dst = host_dst && !is_pinned(dst, n);
  lock.unlock();
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
    submit(stream, Op{[dst, copy] { std::memcpy(dst, copy->data(), copy->size()); }}, cudaGraphNodeTypeMemcpy);
    return cudaSuccess;
  }
  std::atomic<bool> done{false};
  auto* flag = pageable_dst ? &done : nullptr;
  submit(stream, Op{[dst, src, n, flag] {
                      std::memcpy(dst, src, n);
                      if (flag) *flag = true;
                    }},
         cudaGraphNodeTypeMemcpy);
  if (pageable_dst) flush(s, &done);  // returns once the copy has landed
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (Lock lock(books); !is_device(p, n)) die("cudaMemset outside device memory");
  flush_blocking();
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t stream) {
  if (Lock lock(books); n && !is_device(p, n)) die("cudaMemsetAsync outside device memory");
  submit(stream, Op{[p, v, n] { std::memset(p, v, n); }}, cudaGraphNodeTypeMemset);
  return cudaSuccess;
}

cudaError_t cudaMemset2DAsync(void* p, size_t pitch, int v, size_t width, size_t height, cudaStream_t stream) {
  if (Lock lock(books); height && !is_device(p, pitch * (height - 1) + width)) die("cudaMemset2DAsync outside device memory");
  if (width > pitch) return fail(cudaErrorInvalidValue, "cudaMemset2DAsync: width %zu over pitch %zu", width, pitch);
  submit(stream, Op{[=] {
                      for (size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(p) + r * pitch, v, width);
                    }},
         cudaGraphNodeTypeMemset);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  auto* s = new CUstream_st;
  s->blocking = !(flags & cudaStreamNonBlocking);
  Lock lock(books);
  streams.insert(s);
  *stream = s;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (!s) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of a default stream");
  if (s->capture) return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamDestroy while capturing");
  lock.unlock();
  flush(s);
  lock.lock();
  s->destroyed = true;  // kept, so a later use is caught
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    invalidate("cudaStreamSynchronize");
    return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize of a capturing stream");
  }
  lock.unlock();
  if (s) flush(s);
  else flush_blocking();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  if (Lock lock(books); capturing) {
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
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (s && s->capture) {
    e->captured = true;
    e->stream = s;
    return cudaSuccess;
  }
  e->captured = false;
  e->stream = s;
  e->done = false;
  lock.unlock();
  submit(stream, Op{[e] {
           e->when = std::chrono::steady_clock::now();
           e->done = true;
         }},
         cudaGraphNodeTypeEventRecord);
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

// The emulation's time between two events: what it took the host, not what a GPU would.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!start->done || !end->done) return fail(cudaErrorNotReady, "cudaEventElapsedTime of an event not reached");
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  Lock lock(books);
  CUstream_st* s = checked(stream);
  if (!s) return fail(cudaErrorStreamCaptureUnsupported, "capture of a default stream");
  if (capturing) return fail(cudaErrorIllegalState, "a second capture in one thread while one is in progress (not emulated)");
  s->capture = std::make_unique<Capture>();
  s->capture->mode = mode;
  capturing = s;
  if (mode == cudaStreamCaptureModeGlobal) ++global_captures;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  Lock lock(books);
  CUstream_st* s = checked(stream);
  *graph = nullptr;
  if (!s || !s->capture) return fail(cudaErrorIllegalState, "cudaStreamEndCapture of a stream not capturing");
  std::unique_ptr<Capture> capture = std::move(s->capture);
  if (capturing == s) capturing = nullptr;
  if (capture->mode == cudaStreamCaptureModeGlobal) --global_captures;
  if (capture->invalidated) return fail(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture of an invalidated capture");
  *graph = new CUgraph_st{std::make_shared<std::vector<Op>>(std::move(capture->nodes)), {}};
  for (cudaGraphNodeType kind : capture->kinds) (*graph)->kinds.push_back({kind});
  ++graphs_alive;
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  Lock lock(books);
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
// The graph's nodes in capture order (a captured stream's graph is a chain), as real CUDA gives
// them: their number when `nodes` is null, else up to *count of them, the rest of *count nulls.
cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes, size_t* count) {
  if (!graph || !count) return fail(cudaErrorInvalidValue, "cudaGraphGetNodes of a null graph or count");
  const size_t have = graph->kinds.size();
  if (nodes) {
    for (size_t i = 0; i < *count; ++i) nodes[i] = i < have ? &graph->kinds[i] : nullptr;
    *count = std::min(*count, have);
  } else {
    *count = have;
  }
  return cudaSuccess;
}
cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType* type) {
  if (!node || !type) return fail(cudaErrorInvalidValue, "cudaGraphNodeGetType of a null node");
  *type = node->kind;
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
  if (Lock lock(books); checked(stream) && checked(stream)->capture) die("cudaGraphLaunch into a capture (not emulated)");
  auto nodes = exec->nodes;
  submit(stream, Op{[nodes] {
                      ++graph_launches;
                      for (const Op& op : *nodes) op();
                    }},
         cudaGraphNodeTypeGraph);
  return cudaSuccess;
}
}  // extern "C"

// A summary at exit, so a run shows what the emulation did.
static struct Summary {
  ~Summary() {
    if (std::getenv("EMU_QUIET")) return;
    std::fprintf(stderr, "EMU summary: %ld kernels, %ld stream ops, %ld graph launches, %ld captures invalidated, %ld graph execs and %ld graphs alive\n",
                 kernels_run.load(), ops_run.load(), graph_launches.load(), captures_invalidated.load(), graph_execs_alive.load(),
                 graphs_alive.load());
  }
} summary;
