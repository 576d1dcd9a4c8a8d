// CUDA graphs: a step captured once on a side stream and replayed (at::cuda::CUDAGraph).

#include "shim.h"

#ifdef DARTS_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

using namespace darts_shim;

#ifdef DARTS_CUDA
namespace {
struct Graph {
  explicit Graph(c10::DeviceIndex d) : device(d), side(c10::cuda::getStreamFromPool(false, d)), prev(side) {}
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  c10::cuda::CUDAStream prev;
  bool entered = false;
  bool capturing = false;
};

// Makes `to` wait for the work queued on `from` so far.
// (c10's device-generic event, through libc10_cuda: darts does not link CUDA's runtime itself.)
void wait_for(const c10::cuda::CUDAStream& from, const c10::cuda::CUDAStream& to) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(from.unwrap());
  ev.block(to.unwrap());
}
}  // namespace
#endif

extern "C" {

// Whether this build has CUDA graphs (1) or not (0).
int darts_cuda_graphs_available() {
#ifdef DARTS_CUDA
  return 1;
#else
  return 0;
#endif
}

// A new graph for GPU `index` with a side stream of its own from the pool: written to `*out`. Returns 0, or -1.
int darts_graph_new(int index, void** out) {
#ifdef DARTS_CUDA
  return guarded([&] {
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    *out = new Graph(static_cast<c10::DeviceIndex>(index));
    return 0;
  });
#else
  last_error = "this darts was built without CUDA's headers";
  return -1;
#endif
}

// Makes the graph's side stream this thread's current stream on its device, after the work queued so far on
// the stream that was current (as torch.cuda.graph and its warm-up on a side stream do). Returns 0, or -1.
int darts_graph_enter(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (gr->entered) throw std::runtime_error("the graph's side stream is current already");
    gr->prev = c10::cuda::getCurrentCUDAStream(gr->device);
    wait_for(gr->prev, gr->side);
    c10::cuda::setCurrentCUDAStream(gr->side);
    gr->entered = true;
    return 0;
  });
#else
  return -1;
#endif
}

// Makes the stream current before darts_graph_enter current again; it waits for the side stream's work.
int darts_graph_exit(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->entered) return 0;
    c10::cuda::setCurrentCUDAStream(gr->prev);
    wait_for(gr->side, gr->prev);
    gr->entered = false;
    return 0;
  });
#else
  return -1;
#endif
}

// Begins capturing the side stream (entered: darts_graph_enter) into the graph, after synchronising the device
// (torch.cuda.graph synchronises first too). Thread-local capture: only this thread is kept from calls that cannot
// be captured, so darts' data loader thread may go on copying the next batches to the GPU meanwhile (the global
// mode torch.cuda.graph defaults to would fail those copies); the autograd engine's thread launches the backward
// kernels onto the captured stream all the same. Returns 0, or -1.
int darts_graph_capture_begin(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->entered) throw std::runtime_error("capture begins on the graph's side stream: enter it first");
    c10::cuda::device_synchronize();
    gr->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    gr->capturing = true;
    return 0;
  });
#else
  return -1;
#endif
}

// Ends the capture and instantiates the graph. On a failed capture (an operation that cannot be captured ran
// inside it) this returns -1 with CUDA's reason, and the capture is over all the same. Returns 0, or -1.
int darts_graph_capture_end(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->capturing) throw std::runtime_error("no capture to end");
    gr->capturing = false;
    gr->graph.capture_end();
    return 0;
  });
#else
  return -1;
#endif
}

// Replays the captured graph on the current stream. Returns 0, or -1.
int darts_graph_replay(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    static_cast<Graph*>(g)->graph.replay();
    return 0;
  });
#else
  return -1;
#endif
}

// Frees a graph of darts_graph_new (its memory pool goes back to the caching allocator).
void darts_graph_free(void* g) {
#ifdef DARTS_CUDA
  auto* gr = static_cast<Graph*>(g);
  try {
    if (gr->capturing) gr->graph.capture_end();
  } catch (...) {
  }
  try {
    if (gr->entered) c10::cuda::setCurrentCUDAStream(gr->prev);
  } catch (...) {
  }
  delete gr;
#endif
}
}  // extern "C"
