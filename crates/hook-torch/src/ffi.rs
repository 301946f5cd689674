//! The C ABI of the shim (`src/shim/hookrs_shim.cpp`).

use std::ffi::{c_char, c_int, c_void};

/// `at::Tensor*`, the same pointer tch's `C_tensor` is.
pub type AtTensor = torch_sys::C_tensor;

/// The callback the `hookrs::point` op calls: (site, owned input, out replacement) -> status.
pub type Callback = unsafe extern "C" fn(site: i64, x: *mut AtTensor, out: *mut *mut AtTensor) -> c_int;

/// Called once per parameter by `hookrs_parameters`: (ctx, name, owned tensor).
pub type ParameterVisitor = unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char, t: *mut AtTensor);

extern "C" {
    pub fn hookrs_set_callback(cb: Callback);
    pub fn hookrs_set_armed(table: *const u8, len: i64, prev: *mut *const u8, prev_len: *mut i64);
    pub fn hookrs_free(p: *mut c_void);
    pub fn hookrs_point_calls() -> u64;
    pub fn hookrs_load(
        path: *const c_char,
        device: *const c_char,
        constants_device: *const c_char,
        out_module: *mut *mut c_void,
        out_sites: *mut *mut c_char,
        out_desc: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn hookrs_module_free(m: *mut c_void);
    pub fn hookrs_forward(m: *mut c_void, ids: *mut AtTensor, mask: *mut AtTensor, out: *mut *mut AtTensor, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_parameters(m: *mut c_void, visit: ParameterVisitor, ctx: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_device_constants(m: *mut c_void, out_json: *mut *mut c_char, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_from_dlpack(managed: *mut c_void, out: *mut *mut AtTensor, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_to_dlpack(t: *mut AtTensor, out: *mut *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_dlpack_delete(managed: *mut c_void);
    pub fn hookrs_retarget_dtype(m: *mut c_void, from: i64, to: i64, changed: *mut i64, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_dtype_constants(m: *mut c_void, out_json: *mut *mut c_char, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_host_copy(srcs: *mut *mut AtTensor, n: i64, dsts: *mut *mut AtTensor, out_handle: *mut *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_host_copy_wait(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_host_copy_free(handle: *mut c_void);
    pub fn hookrs_cuda_runtime_version() -> std::ffi::c_long;
    pub fn hookrs_memory_guard(limit: i64, why: *const c_char) -> i64;
    pub fn hookrs_memory_held() -> i64;
}
