// The peer communicator: each rank's buffers, flags and call counters in its own device memory,
// every rank's addresses in one table they all hold, and calls larger than the buffers split into
// pieces that every rank cuts alike.

#include <algorithm>

#include "collectives.h"
#include "communicator.h"
#include "cuda_check.h"
#include "device.h"
#include "m1/error.h"

namespace m1::cuda {
namespace {

// What the ranks share: the table of every rank's buffers, and the memory behind it.
struct PeerGroup {
  PeerTable table;
  std::vector<int> devices;
  std::vector<void*> allocations;  // freed with the group, each on its device

  ~PeerGroup() {
    for (size_t i = 0; i < allocations.size(); ++i) {
      // Errors are ignored: a destructor cannot report them.
      DeviceGuard guard(devices[i / 3]);
      cudaFree(allocations[i]);
    }
  }
};

class PeerCommunicator final : public Communicator {
 public:
  PeerCommunicator(std::shared_ptr<PeerGroup> group, PeerRank me) : group_(std::move(group)), me_(me) {}

  std::string name() const override { return "peer"; }

  void all_reduce_sum(float* data, int64_t count, cudaStream_t stream) override {
    const int64_t capacity = group_->table.capacity;
    for (int64_t first = 0; first < count; first += capacity)
      peer_all_reduce(group_->table, me_, data + first, std::min(capacity, count - first), stream);
  }

  void gather_columns(const float* part, int64_t rows, std::span<const int64_t> widths, float* out,
                      cudaStream_t stream) override {
    if (int(widths.size()) != me_.world) fail("gather_columns: {} widths for {} ranks", widths.size(), me_.world);
    ColumnSplit split;
    int64_t widest = 1;
    for (int r = 0; r < me_.world; ++r) {
      split.widths[r] = widths[size_t(r)];
      split.offsets[r] = split.total;
      split.total += widths[size_t(r)];
      widest = std::max(widest, widths[size_t(r)]);
    }
    // Pieces of whole rows that fit every rank's buffer.
    const int64_t piece = std::max<int64_t>(1, group_->table.capacity / widest);
    for (int64_t first = 0; first < rows; first += piece) {
      const int64_t count = std::min(piece, rows - first);
      peer_gather_columns(group_->table, me_, part + first * split.widths[me_.rank], count, split,
                          out ? out + first * split.total : nullptr, stream);
    }
  }

 private:
  std::shared_ptr<PeerGroup> group_;
  PeerRank me_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_peer_communicators(const std::vector<int>& devices, int64_t capacity) {
  const int world = int(devices.size());
  if (world < 1 || world > kMaxPeerRanks)
    fail("--collectives peer: {} ranks (it serves 1 to {})", world, kMaxPeerRanks);
  if (capacity < 1) fail("peer collectives: a capacity of {} floats", capacity);
  // Distinct GPUs read each other's buffers directly.
  for (int a : devices)
    for (int b : devices) {
      if (a == b) continue;
      int can = 0;
      M1_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, a, b));
      if (!can)
        fail("--collectives peer: GPU {} cannot reach GPU {}'s memory (no peer access); use --collectives nccl", a, b);
      DeviceGuard guard(a);
      const cudaError_t status = cudaDeviceEnablePeerAccess(b, 0);
      if (status == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        check(status, "cudaDeviceEnablePeerAccess");
    }
  auto group = std::make_shared<PeerGroup>();
  group->devices = devices;
  group->table.capacity = capacity;
  std::vector<uint32_t*> counters(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    DeviceGuard guard(devices[size_t(r)]);
    void *buffers = nullptr, *flags = nullptr, *counts = nullptr;
    const size_t flag_bytes = size_t(kPeerBlocks) * kMaxPeerRanks * sizeof(uint32_t);
    M1_CUDA_CHECK(cudaMalloc(&buffers, size_t(2 * capacity) * sizeof(float)));
    group->allocations.push_back(buffers);
    M1_CUDA_CHECK(cudaMalloc(&flags, flag_bytes));
    group->allocations.push_back(flags);
    M1_CUDA_CHECK(cudaMalloc(&counts, kPeerBlocks * sizeof(uint32_t)));
    group->allocations.push_back(counts);
    // No call has been made: every flag and counter starts at 0, and the first call is 1.
    M1_CUDA_CHECK(cudaMemset(flags, 0, flag_bytes));
    M1_CUDA_CHECK(cudaMemset(counts, 0, kPeerBlocks * sizeof(uint32_t)));
    M1_CUDA_CHECK(cudaDeviceSynchronize());
    group->table.buffers[r] = static_cast<float*>(buffers);
    group->table.flags[r] = static_cast<uint32_t*>(flags);
    counters[size_t(r)] = static_cast<uint32_t*>(counts);
  }
  std::vector<std::unique_ptr<Communicator>> communicators;
  for (int r = 0; r < world; ++r)
    communicators.push_back(std::make_unique<PeerCommunicator>(group, PeerRank{r, world, counters[size_t(r)]}));
  return communicators;
}

}  // namespace m1::cuda
