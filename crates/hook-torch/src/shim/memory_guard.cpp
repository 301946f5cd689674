// The memory guard: libtorch's CPU allocator, wrapped so that the bytes held by live CPU
// tensors cannot pass a limit. A model whose constants or inputs ask for more gets a
// c10::Error naming the sizes (a clean error in Rust) instead of the kernel's OOM killer.
// Allocations keep data == context, so raw_allocate works. A program opts in
// (hook_torch::runtime::init); nothing installs it behind a caller's back.

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

#include "hookrs_shim.h"

namespace {

struct MemoryGuard final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> limit{0};  // 0: no limit
  std::string why;                 // where the limit came from (set with it, read on refusal)
  std::mutex mu;
  std::unordered_map<void*, std::pair<size_t, c10::DeleterFnPtr>> held;

  static MemoryGuard& get() {
    static MemoryGuard* g = new MemoryGuard();  // never destroyed: tensors may outlive statics
    return *g;
  }

  static void release(void* p) {
    if (p == nullptr) return;
    auto& g = get();
    std::pair<size_t, c10::DeleterFnPtr> e{0, nullptr};
    {
      std::lock_guard<std::mutex> lock(g.mu);
      auto it = g.held.find(p);
      if (it != g.held.end()) {
        e = it->second;
        g.held.erase(it);
      }
    }
    g.live.fetch_sub(static_cast<int64_t>(e.first));
    if (e.second != nullptr) e.second(p);
  }

  c10::DataPtr allocate(size_t n) override {
    const int64_t lim = limit.load(std::memory_order_relaxed);
    const int64_t now = live.load(std::memory_order_relaxed);
    if (lim > 0 && now + static_cast<int64_t>(n) > lim) {
      std::string why_now;
      {
        std::lock_guard<std::mutex> lock(mu);
        why_now = why;
      }
      TORCH_CHECK(false, "out of memory guard: a tensor of ", n, " bytes would bring the CPU tensors held to ", now + static_cast<int64_t>(n),
                  " bytes, past hookrs's limit of ", lim, " bytes (", why_now, "). ",
                  "The model or its input asks for more memory than there is: check the input's size and the model's sizes.");
    }
    c10::DataPtr d = inner->allocate(n);
    void* data = d.get();
    if (data == nullptr || d.get_context() != data) return d;  // not ours to track
    c10::DeleterFnPtr del = d.get_deleter();
    d.release_context();
    {
      std::lock_guard<std::mutex> lock(mu);
      held[data] = {n, del};
    }
    live.fetch_add(static_cast<int64_t>(n));
    return c10::DataPtr(data, data, &MemoryGuard::release, d.device());
  }

  c10::DeleterFnPtr raw_deleter() const override { return &MemoryGuard::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

extern "C" {

// Installs the memory guard over libtorch's CPU allocator (once) and sets its limit in bytes
// (0: no limit). Returns the bytes the CPU tensors hold now.
// `why` says where the limit came from, for the refusal's message.
int64_t hookrs_memory_guard(int64_t limit, const char* why) {
  try {
    auto& g = MemoryGuard::get();
    static std::once_flag once;
    std::call_once(once, [&] {
      g.inner = c10::GetCPUAllocator();
      c10::SetCPUAllocator(&g, /*priority=*/1);
    });
    {
      std::lock_guard<std::mutex> lock(g.mu);
      g.why = why != nullptr ? why : "";
    }
    g.limit.store(limit);
    return g.live.load();
  } catch (...) {
    return -1;
  }
}

// The bytes the CPU tensors allocated through the memory guard hold now.
int64_t hookrs_memory_held() { return MemoryGuard::get().live.load(); }

}  // extern "C"
