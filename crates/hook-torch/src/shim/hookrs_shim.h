// hookrs_shim.h: the C ABI between hook-torch (Rust, `src/ffi.rs`) and its C++ shim.
//
// Conventions, for every function here:
// - A function returning `int` returns 0 on success and 1 on failure, with `*err` set to a
//   message allocated with malloc (free it with hookrs_free). No C++ exception crosses this
//   boundary: each entry point catches them all.
// - `at::Tensor*` arguments are borrowed unless the comment says "owned"; an owned tensor
//   out-parameter is a heap `at::Tensor*` whose ownership moves to the caller (tch's
//   `Tensor::from_ptr` takes it).
// - Structured results cross as the structs below, freed by the matching *_free function.
//
// One file per job implements it: point.cpp (the hook op and the callback into Rust),
// rewrite.cpp (loading and instrumenting a module, its forward and parameters), devices.cpp
// (device constants, the CUDA backend's version), dtypes.cpp (converting a module's dtype),
// memory_guard.cpp, dlpack.cpp, host_copy.cpp (GPU -> host copies on a side stream).
#ifndef HOOKRS_SHIM_H
#define HOOKRS_SHIM_H

#include <stdint.h>

#ifdef __cplusplus
namespace at {
class Tensor;
}
typedef at::Tensor hookrs_tensor;
extern "C" {
#else
typedef struct hookrs_tensor hookrs_tensor;
#endif

// A list of strings (each NUL-terminated, malloc'd); free with hookrs_strings_free.
typedef struct {
  char** items;
  int64_t len;
} hookrs_strings;

// One hook site made by hookrs_load: its id (the graph's `hookrs::point` argument), the
// dotted path of its module, and its kind (`input`, `output`, `attention_matrix[N]`,
// `attention_matrix_pre_softmax[N]`).
typedef struct {
  int64_t id;
  char* module;
  char* kind;
} hookrs_site;

// The sites of a loaded module; free with hookrs_sites_free.
typedef struct {
  hookrs_site* items;
  int64_t len;
} hookrs_sites;

// ---- point.cpp: the hook op ----

// The callback `hookrs::point` calls for an armed site: (site, owned input, out replacement)
// -> status. Status 0: *out is null (unchanged) or an owned replacement. Status != 0: a hook
// failed (the Rust side keeps the error); the op throws and the forward unwinds.
typedef int (*hookrs_callback)(int64_t site, hookrs_tensor* x, hookrs_tensor** out);
void hookrs_set_callback(hookrs_callback cb);
// Sets this thread's armed-site table (null: no site armed; byte `site` non-zero: a hook
// waits there) and returns the previous one, so nested forwards restore it.
void hookrs_set_armed(const uint8_t* table, int64_t len, const uint8_t** prev, int64_t* prev_len);
// How many sites (armed or idle) ran on this thread.
uint64_t hookrs_point_calls(void);
void hookrs_free(void* p);
void hookrs_strings_free(hookrs_strings* s);
void hookrs_sites_free(hookrs_sites* s);

// ---- rewrite.cpp: loading, instrumenting, running ----

// Loads `path` with its tensors on `device` (c10 device string: "cpu", "cuda:0"), points the
// graphs' device constants at `constants_device`, puts the module in eval mode and instruments
// every submodule in place. *out_module: an owned torch::jit::Module* (hookrs_module_free);
// *out_sites: the sites; *out_desc: the `hookrs.json` extra file (empty when absent).
int hookrs_load(const char* path, const char* device, const char* constants_device, void** out_module, hookrs_sites* out_sites,
                char** out_desc, char** err);
void hookrs_module_free(void* m);
// forward(input_ids, attention_mask) -> the logits (the returned tensor, or element 0 of a
// returned tuple), owned, in *out.
int hookrs_forward(void* m, hookrs_tensor* ids, hookrs_tensor* mask, hookrs_tensor** out, char** err);
// step(input_ids, attention_mask, past[0..n_past]) -> the logits and n_past new key/value
// tensors, owned, in out[0..n_past] (room for n_past + 1).
int hookrs_step(void* m, hookrs_tensor* ids, hookrs_tensor* mask, hookrs_tensor** past, int64_t n_past, hookrs_tensor** out, char** err);
// Calls visit(ctx, name, owned tensor) for every parameter (recursively named, `a.b.weight`).
typedef void (*hookrs_parameter_visitor)(void* ctx, const char* name, hookrs_tensor* t);
int hookrs_parameters(void* m, hookrs_parameter_visitor visit, void* ctx, char** err);

// ---- devices.cpp ----

// The device named by each device or tensor constant of the module's graphs.
int hookrs_device_constants(void* m, hookrs_strings* out, char** err);
// The CUDA runtime version libtorch's CUDA hooks report (e.g. 13000), or -1 when they are
// libtorch's stub (libtorch_cuda.so was not loaded before the first CUDA query).
long hookrs_cuda_runtime_version(void);

// ---- dtypes.cpp ----

// Converts the module from dtype `from` to `to` (c10 ScalarType codes); *changed: how many
// tensors and constants changed.
int hookrs_retarget_dtype(void* m, int64_t from, int64_t to, int64_t* changed, char** err);
// The dtype named by each constant `dtype` argument of the module's graphs (`Float`, ...).
int hookrs_dtype_constants(void* m, hookrs_strings* out, char** err);

// ---- memory_guard.cpp ----

// Installs the memory guard over libtorch's CPU allocator (once) and sets its limit in bytes
// (0: no limit); `why` says where the limit came from. Returns the bytes CPU tensors hold now
// (-1 on failure).
int64_t hookrs_memory_guard(int64_t limit, const char* why);
// The bytes the CPU tensors allocated through the guard hold now.
int64_t hookrs_memory_held(void);

// ---- dlpack.cpp: zero-copy exchange with another framework in this process ----

// The tensor a DLManagedTensor* describes (consumed), owned, in *out.
int hookrs_from_dlpack(void* managed, hookrs_tensor** out, char** err);
// A DLManagedTensor* viewing `t` (shares its memory), owned by the caller, in *out.
int hookrs_to_dlpack(hookrs_tensor* t, void** out, char** err);
// Frees a DLManagedTensor* nobody consumed (null: nothing).
void hookrs_dlpack_delete(void* managed);

// ---- host_copy.cpp ----

// Copies `n` tensors of one non-CPU device into pinned host memory on a side stream (after
// the work queued on the compute stream). `dsts` receives n owned host tensors, readable after
// hookrs_host_copy_wait; *out_handle owns the event and the sources (hookrs_host_copy_free,
// which waits first).
int hookrs_host_copy(hookrs_tensor** srcs, int64_t n, hookrs_tensor** dsts, void** out_handle, char** err);
int hookrs_host_copy_wait(void* handle, char** err);
void hookrs_host_copy_free(void* handle);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // HOOKRS_SHIM_H
