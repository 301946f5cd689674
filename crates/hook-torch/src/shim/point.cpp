// The `hookrs::point(Tensor x, int site) -> Tensor` op and the callback into Rust.
//
// The op is registered with AliasAnalysisKind::CONSERVATIVE (the JIT may neither remove nor
// merge it) and a CompositeImplicitAutograd kernel (autograd sees straight through it). An idle
// site returns its input here, without crossing into Rust; an armed one calls the callback,
// and a failed hook makes the op throw a c10::Error that surfaces from the forward call.

#include <torch/library.h>

#include <atomic>

#include "internal.h"

namespace {

std::atomic<hookrs_callback> g_callback{nullptr};

// The armed-site table of the forward running on this thread: byte `site` is non-zero when a
// hook waits there. An idle site (no table, or a zero byte) returns its input at once and
// never crosses into Rust. Rust sets the table for the duration of one forward.
thread_local const uint8_t* t_armed = nullptr;
thread_local int64_t t_armed_len = 0;
// How many sites ran on this thread (armed or idle): diagnostics and tests.
thread_local uint64_t t_point_calls = 0;

at::Tensor point_impl(const at::Tensor& x, int64_t site) {
  ++t_point_calls;
  if (site < 0 || site >= t_armed_len || t_armed[site] == 0) {
    return x;
  }
  hookrs_callback cb = g_callback.load(std::memory_order_acquire);
  if (cb == nullptr) {
    return x;
  }
  at::Tensor* out = nullptr;
  int status = cb(site, new at::Tensor(x), &out);
  if (status != 0) {
    TORCH_CHECK(false, "hookrs: a hook failed at site ", site, " (the error is reported by hookrs)");
  }
  if (out == nullptr) {
    return x;
  }
  at::Tensor r = std::move(*out);
  delete out;
  return r;
}

}  // namespace

TORCH_LIBRARY(hookrs, m) {
  m.def(torch::schema("hookrs::point(Tensor x, int site) -> Tensor", c10::AliasAnalysisKind::CONSERVATIVE));
}

TORCH_LIBRARY_IMPL(hookrs, CompositeImplicitAutograd, m) {
  m.impl("point", point_impl);
}

extern "C" {

void hookrs_set_callback(hookrs_callback cb) { g_callback.store(cb, std::memory_order_release); }

void hookrs_set_armed(const uint8_t* table, int64_t len, const uint8_t** prev, int64_t* prev_len) {
  *prev = t_armed;
  *prev_len = t_armed_len;
  t_armed = table;
  t_armed_len = table == nullptr ? 0 : len;
}

uint64_t hookrs_point_calls(void) { return t_point_calls; }

void hookrs_free(void* p) { std::free(p); }

void hookrs_strings_free(hookrs_strings* s) {
  if (s == nullptr || s->items == nullptr) return;
  for (int64_t i = 0; i < s->len; ++i) std::free(s->items[i]);
  std::free(s->items);
  s->items = nullptr;
  s->len = 0;
}

void hookrs_sites_free(hookrs_sites* s) {
  if (s == nullptr || s->items == nullptr) return;
  for (int64_t i = 0; i < s->len; ++i) {
    std::free(s->items[i].module);
    std::free(s->items[i].kind);
  }
  std::free(s->items);
  s->items = nullptr;
  s->len = 0;
}

}  // extern "C"
