//! The C ABI of the shim, as `src/shim/hookrs_shim.h` declares it (the header states the
//! conventions: status codes, `*err` messages, who owns what). A test reads the header and
//! checks that every function in it is declared here with as many parameters, and no other.

use std::ffi::{c_char, c_int, c_long, c_void};

/// `at::Tensor*` (`hookrs_tensor*`), the same pointer tch's `C_tensor` is.
pub type AtTensor = torch_sys::C_tensor;

/// `hookrs_strings`: a list of malloc'd strings, freed with [`hookrs_strings_free`].
#[repr(C)]
pub struct Strings {
    pub items: *mut *mut c_char,
    pub len: i64,
}

impl Strings {
    pub const EMPTY: Strings = Strings { items: std::ptr::null_mut(), len: 0 };
}

/// `hookrs_site`: one site made by `hookrs_load`.
#[repr(C)]
pub struct Site {
    pub id: i64,
    pub module: *mut c_char,
    pub kind: *mut c_char,
}

/// `hookrs_sites`: the sites of a loaded module, freed with [`hookrs_sites_free`].
#[repr(C)]
pub struct Sites {
    pub items: *mut Site,
    pub len: i64,
}

impl Sites {
    pub const EMPTY: Sites = Sites { items: std::ptr::null_mut(), len: 0 };
}

/// `hookrs_callback`: (site, owned input, out replacement) -> status.
pub type Callback = unsafe extern "C" fn(site: i64, x: *mut AtTensor, out: *mut *mut AtTensor) -> c_int;

/// `hookrs_parameter_visitor`: (ctx, name, owned tensor).
pub type ParameterVisitor = unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char, t: *mut AtTensor);

extern "C" {
    // point.cpp
    pub fn hookrs_set_callback(cb: Callback);
    pub fn hookrs_set_armed(table: *const u8, len: i64, prev: *mut *const u8, prev_len: *mut i64);
    pub fn hookrs_point_calls() -> u64;
    pub fn hookrs_free(p: *mut c_void);
    pub fn hookrs_strings_free(s: *mut Strings);
    pub fn hookrs_sites_free(s: *mut Sites);
    // rewrite.cpp
    pub fn hookrs_load(
        path: *const c_char,
        device: *const c_char,
        constants_device: *const c_char,
        out_module: *mut *mut c_void,
        out_sites: *mut Sites,
        out_desc: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn hookrs_module_free(m: *mut c_void);
    pub fn hookrs_forward(m: *mut c_void, ids: *mut AtTensor, mask: *mut AtTensor, out: *mut *mut AtTensor, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_step(m: *mut c_void, ids: *mut AtTensor, mask: *mut AtTensor, past: *mut *mut AtTensor, n_past: i64, out: *mut *mut AtTensor, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_parameters(m: *mut c_void, visit: ParameterVisitor, ctx: *mut c_void, err: *mut *mut c_char) -> c_int;
    // devices.cpp
    pub fn hookrs_device_constants(m: *mut c_void, out: *mut Strings, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_cuda_runtime_version() -> c_long;
    // dtypes.cpp
    pub fn hookrs_retarget_dtype(m: *mut c_void, from: i64, to: i64, changed: *mut i64, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_dtype_constants(m: *mut c_void, out: *mut Strings, err: *mut *mut c_char) -> c_int;
    // memory_guard.cpp
    pub fn hookrs_memory_guard(limit: i64, why: *const c_char) -> i64;
    pub fn hookrs_memory_held() -> i64;
    // dlpack.cpp
    pub fn hookrs_from_dlpack(managed: *mut c_void, out: *mut *mut AtTensor, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_to_dlpack(t: *mut AtTensor, out: *mut *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_dlpack_delete(managed: *mut c_void);
    // host_copy.cpp
    pub fn hookrs_host_copy(srcs: *mut *mut AtTensor, n: i64, dsts: *mut *mut AtTensor, out_handle: *mut *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_host_copy_wait(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
    pub fn hookrs_host_copy_free(handle: *mut c_void);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// name -> parameter count of every function a C header or this file declares.
    fn functions(text: &str, rust: bool) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        // one declaration may span lines: join, then split at `;`
        let text: String = text.lines().filter(|l| !l.trim_start().starts_with("//") && !l.trim_start().starts_with('#')).collect::<Vec<_>>().join(" ");
        for decl in text.split(';') {
            let Some(at) = decl.find("hookrs_") else { continue };
            let (head, rest) = decl.split_at(at);
            if decl.contains("typedef") || (rust && !head.trim_end().ends_with("fn")) {
                continue;
            }
            let Some(open) = rest.find('(') else { continue };
            let name = rest[..open].trim().to_string();
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let params = &rest[open + 1..rest.rfind(')').unwrap_or(rest.len())];
            let params = params.split(')').next().unwrap_or("");
            let n = if params.trim().is_empty() || params.trim() == "void" { 0 } else { params.split(',').filter(|p| !p.trim().is_empty()).count() };
            out.insert(name, n);
        }
        out
    }

    #[test]
    fn every_function_of_the_header_is_declared_here_with_as_many_parameters() {
        let header = functions(include_str!("shim/hookrs_shim.h"), false);
        let here = functions(include_str!("ffi.rs").split("#[cfg(test)]").next().unwrap(), true);
        assert!(header.len() >= 20, "read {} functions from the header: {header:?}", header.len());
        assert_eq!(header, here, "hookrs_shim.h and ffi.rs disagree");
    }
}
