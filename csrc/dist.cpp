// torch.distributed (c10d): a process group over a TCPStore, and the collectives darts uses.

#include "shim.h"

#ifdef DARTS_DIST
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef DARTS_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

using namespace darts_shim;

#ifdef DARTS_DIST
namespace {
struct ProcessGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};
}  // namespace
#endif

extern "C" {

// Whether this build has c10d (1) or not (0).
int darts_dist_available() {
#ifdef DARTS_DIST
  return 1;
#else
  return 0;
#endif
}

// Whether this build has c10d's NCCL backend (1) or not (0).
int darts_nccl_available() {
#ifdef DARTS_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the process group of `world` processes as `rank`: a TCPStore at host:port (served by this process when
// `is_server`, else by rank 0 or torchrun's agent), its keys under `prefix`, and a backend: Gloo (`backend` 0),
// whose device binds to `bind` (an address or host name), or to interface `iface` when that is not empty; or
// NCCL (`backend` 1) on CUDA device `cuda_device`, which becomes this thread's current device. Waits up to
// `timeout_ms` for the others. Writes the group to `*out`. Returns 0, or -1 (see darts_last_error).
int darts_pg_new(const char* host, int port, int is_server, int rank, int world, const char* bind, const char* iface,
                 const char* prefix, int64_t timeout_ms, int backend, int cuda_device, void** out) {
#ifdef DARTS_DIST
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    if (backend == 1) {
#ifdef DARTS_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = std::chrono::milliseconds(timeout_ms);
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
      // Bound to its GPU, as torch.distributed's device_id: communicators are made for it, barriers use it.
      nccl->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
      *out = new ProcessGroup{tcp, nccl};
      return 0;
#else
      last_error = "this darts was built without NCCL (nccl.h and CUDA's headers were missing at build time)";
      return -1;
#endif
    }
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    if (iface != nullptr && iface[0] != 0) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind));
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new ProcessGroup{tcp, gloo};
    return 0;
  });
#else
  last_error = "this darts was built without c10d (install libgloo-dev, then rebuild)";
  return -1;
#endif
}

// Sums `n` tensors over all processes of `pg`, in place, and waits. Returns 0, or -1.
int darts_pg_allreduce_sum(void* pg, const at::Tensor* const* tensors, int n) {
#ifdef DARTS_DIST
  return guarded([&] {
    auto ts = tensor_list(tensors, n);
    auto work = static_cast<ProcessGroup*>(pg)->backend->allreduce(ts);
    work->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Copies `n` tensors of process `root` to every process of `pg`, in place, and waits. Returns 0, or -1.
int darts_pg_broadcast(void* pg, const at::Tensor* const* tensors, int n, int root) {
#ifdef DARTS_DIST
  return guarded([&] {
    auto ts = tensor_list(tensors, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    auto work = static_cast<ProcessGroup*>(pg)->backend->broadcast(ts, o);
    work->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Waits until every process of `pg` has called it. Returns 0, or -1.
int darts_pg_barrier(void* pg) {
#ifdef DARTS_DIST
  return guarded([&] {
    static_cast<ProcessGroup*>(pg)->backend->barrier()->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Leaves and frees the process group.
void darts_pg_free(void* pg) {
#ifdef DARTS_DIST
  delete static_cast<ProcessGroup*>(pg);
#endif
}

}  // extern "C"
