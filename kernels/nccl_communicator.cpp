// The NCCL communicator: NCCL moves the data, our kernels add it up in rank order. libnccl.so.2
// is loaded at run time, when a group first asks for NCCL, so that builds and tools that never use
// it do not need it installed (the CUDA toolkit ships the header; the library may live elsewhere,
// in a Python wheel say: put its folder on LD_LIBRARY_PATH).

#include <algorithm>
#include <memory>

#include "collectives.h"
#include "communicator.h"
#include "cuda_check.h"
#include "device.h"
#include "device_scratch.h"
#include "m1/error.h"

#ifdef M1_HAVE_NCCL
#include <dlfcn.h>
#include <nccl.h>
#endif

namespace m1::cuda {
namespace {

void require_gpu_per_rank(const std::vector<int>& devices) {
  for (size_t a = 0; a < devices.size(); ++a)
    for (size_t b = a + 1; b < devices.size(); ++b)
      if (devices[a] == devices[b])
        fail("--collectives nccl: GPU {} is listed for ranks {} and {}; NCCL needs a GPU of its own for every rank "
             "(--collectives peer lets ranks share one)",
             devices[a], a, b);
}

}  // namespace

#ifdef M1_HAVE_NCCL
namespace {

// The NCCL calls m1 makes, looked up in the loaded library.
struct NcclApi {
  decltype(&ncclCommInitAll) comm_init_all = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;

  // Loaded once per process; throws m1::Error when the library or a symbol is missing.
  static const NcclApi& get() {
    static const NcclApi api = load();
    return api;
  }

 private:
  static NcclApi load() {
    void* library = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!library) fail("--collectives nccl: cannot load libnccl.so.2 ({}); put NCCL's folder on LD_LIBRARY_PATH", dlerror());
    NcclApi api;
    auto find = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(library, name));
      if (!fn) fail("--collectives nccl: libnccl.so.2 has no {}", name);
    };
    find(api.comm_init_all, "ncclCommInitAll");
    find(api.comm_destroy, "ncclCommDestroy");
    find(api.all_gather, "ncclAllGather");
    find(api.send, "ncclSend");
    find(api.recv, "ncclRecv");
    find(api.group_start, "ncclGroupStart");
    find(api.group_end, "ncclGroupEnd");
    find(api.error_string, "ncclGetErrorString");
    return api;  // the library stays loaded for the life of the process
  }
};

void nccl_check(ncclResult_t result, const char* call) {
  if (result != ncclSuccess) fail("{} failed: {}", call, NcclApi::get().error_string(result));
}

// The ranks' communicators, made together and destroyed together.
struct NcclGroup {
  std::vector<ncclComm_t> comms;
  ~NcclGroup() {
    for (ncclComm_t comm : comms) NcclApi::get().comm_destroy(comm);  // errors ignored: a destructor cannot report them
  }
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<NcclGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}

  std::string name() const override { return "nccl"; }

  void all_reduce_sum(float* data, int64_t count, cudaStream_t stream) override {
    if (count == 0) return;
    const int world = int(group_->comms.size());
    float* gathered = staging(stream).get<float>(size_t(world * count));
    nccl_check(NcclApi::get().all_gather(data, gathered, size_t(count), ncclFloat32, comm(), stream), "ncclAllGather");
    sum_in_rank_order(gathered, world, count, data, stream);
  }

  void gather_columns(const float* part, int64_t rows, std::span<const int64_t> widths, float* out,
                      cudaStream_t stream) override {
    const int world = int(group_->comms.size());
    if (int(widths.size()) != world) fail("gather_columns: {} widths for {} ranks", widths.size(), world);
    if (world > kMaxPeerRanks) fail("gather_columns: {} ranks (at most {})", world, kMaxPeerRanks);
    ColumnSplit split;
    for (int r = 0; r < world; ++r) {
      split.widths[r] = widths[size_t(r)];
      split.offsets[r] = split.total;
      split.total += widths[size_t(r)];
    }
    const NcclApi& nccl = NcclApi::get();
    float* gathered = rank_ == 0 ? staging(stream).get<float>(size_t(rows * split.total)) : nullptr;
    nccl_check(nccl.group_start(), "ncclGroupStart");
    if (rank_ == 0) {
      for (int r = 1; r < world; ++r)
        nccl_check(nccl.recv(gathered + rows * split.offsets[r], size_t(rows * split.widths[r]), ncclFloat32, r, comm(),
                             stream),
                   "ncclRecv");
    } else {
      nccl_check(nccl.send(part, size_t(rows * split.widths[rank_]), ncclFloat32, 0, comm(), stream), "ncclSend");
    }
    nccl_check(nccl.group_end(), "ncclGroupEnd");
    if (rank_ != 0) return;
    if (rows * split.widths[0] > 0)
      M1_CUDA_CHECK(cudaMemcpyAsync(gathered, part, size_t(rows * split.widths[0]) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, stream));
    place_columns(gathered, world, rows, split, out, stream);
  }

 private:
  ncclComm_t comm() const { return group_->comms[size_t(rank_)]; }
  // On the stream of the calls, which is the rank's one stream.
  DeviceScratch& staging(cudaStream_t stream) {
    if (!staging_) staging_ = std::make_unique<DeviceScratch>(stream);
    return *staging_;
  }

  std::shared_ptr<NcclGroup> group_;
  int rank_;
  std::unique_ptr<DeviceScratch> staging_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices) {
  require_gpu_per_rank(devices);
  const NcclApi& nccl = NcclApi::get();
  auto group = std::make_shared<NcclGroup>();
  group->comms.resize(devices.size());
  nccl_check(nccl.comm_init_all(group->comms.data(), int(devices.size()), devices.data()), "ncclCommInitAll");
  std::vector<std::unique_ptr<Communicator>> communicators;
  for (size_t r = 0; r < devices.size(); ++r) communicators.push_back(std::make_unique<NcclCommunicator>(group, int(r)));
  return communicators;
}

#else

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices) {
  require_gpu_per_rank(devices);
  fail("--collectives nccl: this build of m1 has no NCCL (nccl.h was not found with the CUDA toolkit, or it is the CPU "
       "emulation of the GPU); use --collectives peer");
}

#endif

}  // namespace m1::cuda
