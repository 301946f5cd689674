// GPU -> host copies of cache entries on a side stream, beside the next batch's forward.

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "internal.h"

using namespace hookrs;

namespace {

// A batch of device -> host copies queued on a side stream (see hookrs_host_copy). The
// sources are kept alive until the copies are complete: freed earlier, the caching allocator
// could hand their memory to the next forward pass on the compute stream while the side
// stream still reads it.
struct HostCopy {
  c10::Event done;
  std::vector<at::Tensor> sources;
  explicit HostCopy(c10::DeviceType t) : done(t) {}
  ~HostCopy() {
    try {
      done.synchronize();  // never release the sources under a running copy
    } catch (...) {
    }
  }
};

}  // namespace

extern "C" {

// Copies `n` tensors of one non-CPU device into pinned host memory on a side stream: the
// side stream first waits for the work already queued on the device's current (compute)
// stream, so the copies see the finished values, and then runs beside whatever is queued
// next (the next batch's forward). Nothing here blocks the host. `dsts` receives n owned
// host tensors, readable only after hookrs_host_copy_wait; `*out_handle` owns the event and
// the sources (free with hookrs_host_copy_free, which waits first). 0, or 1 and *err.
int hookrs_host_copy(at::Tensor** srcs, int64_t n, at::Tensor** dsts, void** out_handle, char** err) {
  return guard(err, [&]() -> int {
    *out_handle = nullptr;
    TORCH_CHECK(n > 0, "hookrs_host_copy: no tensors");
    const c10::Device dev = srcs[0]->device();
    TORCH_CHECK(!dev.is_cpu(), "hookrs_host_copy: the tensors are already in host memory");
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK(srcs[i]->device() == dev, "hookrs_host_copy: tensors on ", dev, " and ", srcs[i]->device());
    }
    c10::impl::VirtualGuardImpl impl(dev.type());
    const c10::Stream compute = impl.getStream(dev);
    const c10::Stream side = impl.getStreamFromGlobalPool(dev, /*isHighPriority=*/false);
    c10::Event ready(dev.type());
    ready.record(compute);
    ready.block(side);
    auto handle = std::make_unique<HostCopy>(dev.type());
    std::vector<at::Tensor> out;
    out.reserve(n);
    {
      c10::StreamGuard on_side(side);
      for (int64_t i = 0; i < n; ++i) {
        const at::Tensor& src = *srcs[i];
        at::Tensor host = at::empty(src.sizes(), src.options().device(at::kCPU).pinned_memory(true));
        host.copy_(src, /*non_blocking=*/true);
        out.push_back(host);
        handle->sources.push_back(src);
      }
    }
    handle->done.record(side);
    for (int64_t i = 0; i < n; ++i) dsts[i] = new at::Tensor(std::move(out[i]));
    *out_handle = handle.release();
    return 0;
  });
}

// Blocks until the copies of `handle` are complete.
int hookrs_host_copy_wait(void* handle, char** err) {
  return guard(err, [&]() -> int {
    static_cast<HostCopy*>(handle)->done.synchronize();
    return 0;
  });
}

void hookrs_host_copy_free(void* handle) { delete static_cast<HostCopy*>(handle); }

}  // extern "C"
