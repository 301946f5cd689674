//! The C ABI of the shim (`src/shim/hookrs_shim.cpp`).

use std::ffi::{c_char, c_int, c_void};

/// `at::Tensor*`, the same pointer tch's `C_tensor` is.
pub type AtTensor = torch_sys::C_tensor;

/// The callback the `hookrs::point` op calls: (site, owned input, out replacement) -> status.
pub type Callback = unsafe extern "C" fn(site: i64, x: *mut AtTensor, out: *mut *mut AtTensor) -> c_int;

extern "C" {
    pub fn hookrs_set_callback(cb: Callback);
    pub fn hookrs_free(p: *mut c_void);
    pub fn hookrs_instrument(
        path: *const c_char,
        out_bytes: *mut *mut c_char,
        out_len: *mut usize,
        out_sites: *mut *mut c_char,
        out_desc: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
}
