//! [`ScriptModule`]: the instrumented TorchScript module, owned through the shim.
//!
//! The shim loads the archive with its tensors on the target device, retargets the graphs'
//! device constants, instruments every submodule in place and hands back that same module
//! object: nothing is saved and loaded again, so an instrumented load costs what a plain
//! `torch::jit::load` costs, in time and in memory.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

use tch::{Device, Tensor};

use crate::error::{Result, TorchError};
use crate::ffi::{self, AtTensor};

/// An owned `torch::jit::Module*` made by `hookrs_load`.
pub(crate) struct ScriptModule {
    ptr: *mut c_void,
}

// SAFETY: a torch::jit::Module may be moved between threads; every use goes through `&self`
// (forward, parameters) or `&mut self` of the owning HookedModule, which is not `Sync`.
unsafe impl Send for ScriptModule {}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from hookrs_load and is freed once, here.
        unsafe { ffi::hookrs_module_free(self.ptr) }
    }
}

/// The c10 name of a tch device (`cpu`, `cuda:0`, `mps`).
pub(crate) fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// Takes a string the shim allocated (null: empty).
fn take(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc, freed once here.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { ffi::hookrs_free(p.cast()) };
    s
}

/// What a libtorch message says, without its backtrace: the first line, or, for an error
/// raised inside the model's TorchScript code, the error itself (e.g. `RuntimeError: index out
/// of range in self`) and the innermost line of code that raised it.
///
/// ```ignore
/// let m = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"code/__torch__.py\", line 12, in forward\n    x = torch.embedding(w, ids)\n        ~~~~~~~~~~~~~~~ <--- HERE\nRuntimeError: index out of range in self\n";
/// assert_eq!(first_line(m), "the model's TorchScript code raised RuntimeError: index out of range in self (code/__torch__.py, line 12: x = torch.embedding(w, ids))");
/// ```
fn first_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    let first = lines.first().copied().unwrap_or("");
    if !first.contains("failed in the TorchScript interpreter") {
        return first.to_string();
    }
    let cause = lines.iter().rev().find(|l| !l.starts_with(' ') && (l.contains("Error") || l.contains("Exception"))).or(lines.last()).copied().unwrap_or(first);
    // the innermost frame of the model's own code, not of torch's library functions
    let frames: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].trim_start().starts_with("File \"")).collect();
    let own = frames.iter().rev().find(|&&i| !lines[i].contains("/torch/")).or(frames.last()).copied();
    let frame = own.map(|i| {
        let f = lines[i].trim().trim_start_matches("File ").replace('"', "");
        let f = f.split(", in ").next().unwrap_or(&f).to_string();
        match lines.get(i + 1) {
            Some(code) if !code.contains("<--- HERE") && !code.trim().starts_with('~') => format!(" ({f}: {})", code.trim()),
            _ => format!(" ({f})"),
        }
    });
    format!("the model's TorchScript code raised {cause}{}", frame.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::first_line;

    #[test]
    fn torchscript_errors_name_their_cause_and_line() {
        let m = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"code/__torch__.py\", line 12, in forward\n    x = torch.embedding(w, ids)\n        ~~~~~~~~~~~~~~~ <--- HERE\nRuntimeError: index out of range in self\n";
        assert_eq!(first_line(m), "the model's TorchScript code raised RuntimeError: index out of range in self (code/__torch__.py, line 12: x = torch.embedding(w, ids))");
        assert_eq!(first_line("shape mismatch\nException raised from foo at bar.cpp"), "shape mismatch");
        assert_eq!(first_line(""), "");
    }
}

/// The error of a failed shim call: the first line of its message (`fallback` when it sent
/// none). Frees the message.
pub(crate) fn shim_error(err: *mut c_char, fallback: &str) -> TorchError {
    let msg = first_line(&take(err));
    TorchError::Torch(tch::TchError::Torch(if msg.is_empty() { fallback.to_string() } else { msg }))
}

/// c10's `ScalarType` code of a model dtype.
fn scalar_type(kind: tch::Kind) -> Result<i64> {
    match kind {
        tch::Kind::Half => Ok(5),
        tch::Kind::Float => Ok(6),
        tch::Kind::BFloat16 => Ok(15),
        k => Err(TorchError::Input(format!("{k:?} is not a model dtype (float32, bfloat16 or float16)"))),
    }
}

/// One site `hookrs_load` made: its graph id, the dotted path of its module, its kind.
pub(crate) struct RawSite {
    pub id: usize,
    pub module: String,
    pub kind: String,
}

/// What `hookrs_load` returns.
pub(crate) struct Loaded {
    pub module: ScriptModule,
    pub sites: Vec<RawSite>,
    pub description_json: String,
}

/// Takes a `hookrs_strings` the shim filled (and frees it).
fn take_strings(mut s: ffi::Strings) -> Vec<String> {
    let items = if s.items.is_null() {
        Vec::new()
    } else {
        // SAFETY: the shim filled `len` NUL-terminated strings.
        (0..s.len as usize).map(|i| unsafe { CStr::from_ptr(*s.items.add(i)) }.to_string_lossy().into_owned()).collect()
    };
    // SAFETY: `s` came from the shim and is freed once, here.
    unsafe { ffi::hookrs_strings_free(&mut s) };
    items
}

/// Takes a `hookrs_sites` the shim filled (and frees it).
fn take_sites(mut s: ffi::Sites) -> Vec<RawSite> {
    let text = |p: *mut c_char| if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() };
    let items = if s.items.is_null() {
        Vec::new()
    } else {
        (0..s.len as usize)
            .map(|i| {
                // SAFETY: the shim filled `len` sites with NUL-terminated strings.
                let site = unsafe { &*s.items.add(i) };
                RawSite { id: site.id as usize, module: text(site.module), kind: text(site.kind) }
            })
            .collect()
    };
    // SAFETY: `s` came from the shim and is freed once, here.
    unsafe { ffi::hookrs_sites_free(&mut s) };
    items
}

impl ScriptModule {
    /// Loads `path` with its tensors on `device`, device constants pointed at
    /// `constants_device`, in eval mode, every submodule instrumented.
    pub(crate) fn load(path: &Path, device: Device, constants_device: &str) -> Result<Loaded> {
        let load_err = |reason: String| TorchError::Load { path: path.to_path_buf(), reason };
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| load_err("the path contains a NUL byte".into()))?;
        let cdev = CString::new(device_name(device)).expect("device names have no NUL");
        let cconst = CString::new(constants_device).map_err(|_| load_err("the device name contains a NUL byte".into()))?;
        let (mut module, mut sites, mut desc, mut err) = (std::ptr::null_mut(), ffi::Sites::EMPTY, std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: every pointer is valid; the shim catches every C++ exception.
        let status = unsafe { ffi::hookrs_load(cpath.as_ptr(), cdev.as_ptr(), cconst.as_ptr(), &mut module, &mut sites, &mut desc, &mut err) };
        if status != 0 {
            let first = first_line(&take(err));
            return Err(load_err(if first.contains("PytorchStreamReader") || first.contains("zip") {
                format!("not a TorchScript archive ({first})")
            } else {
                first
            }));
        }
        Ok(Loaded { module: ScriptModule { ptr: module }, sites: take_sites(sites), description_json: take(desc) })
    }

    /// `forward(input_ids, attention_mask)`: the logits (the returned tensor, or element 0 of
    /// a returned tuple).
    pub(crate) fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (mut out, mut err) = (std::ptr::null_mut::<AtTensor>(), std::ptr::null_mut());
        // SAFETY: the tensors outlive the call; the shim only reads them and catches every exception.
        let status = unsafe { ffi::hookrs_forward(self.ptr, ids.as_ptr() as *mut AtTensor, mask.as_ptr() as *mut AtTensor, &mut out, &mut err) };
        if status != 0 {
            return Err(shim_error(err, "the shim call failed"));
        }
        // SAFETY: on success `out` is a heap at::Tensor* whose ownership moves to us.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// `step(input_ids, attention_mask, past...)`: the logits and one new tensor per past
    /// tensor (the archive's cached step; see `export.py`'s `with_mask_positions`).
    pub(crate) fn step(&self, ids: &Tensor, mask: &Tensor, past: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let mut ptrs: Vec<*mut AtTensor> = past.iter().map(|t| t.as_ptr() as *mut AtTensor).collect();
        let mut out: Vec<*mut AtTensor> = vec![std::ptr::null_mut(); past.len() + 1];
        let mut err = std::ptr::null_mut();
        // SAFETY: the tensors outlive the call; `out` has room for n_past + 1 pointers, which the
        // shim fills only on success; it catches every exception.
        let status = unsafe {
            ffi::hookrs_step(self.ptr, ids.as_ptr() as *mut AtTensor, mask.as_ptr() as *mut AtTensor, ptrs.as_mut_ptr(), past.len() as i64, out.as_mut_ptr(), &mut err)
        };
        if status != 0 {
            return Err(shim_error(err, "the shim call failed"));
        }
        // SAFETY: on success every entry is a heap at::Tensor* whose ownership moves to us.
        let mut tensors = out.into_iter().map(|p| unsafe { Tensor::from_ptr(p) });
        let logits = tensors.next().expect("n_past + 1 tensors");
        Ok((logits, tensors.collect()))
    }

    /// Every parameter by its torch name (`model.layers.0.self_attn.o_proj.weight`).
    pub(crate) fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        unsafe extern "C" fn visit(ctx: *mut c_void, name: *const c_char, t: *mut AtTensor) {
            // SAFETY: ctx is the Vec below; name is NUL-terminated; t is owned by us.
            let list = unsafe { &mut *(ctx as *mut Vec<(String, Tensor)>) };
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
            list.push((name, unsafe { Tensor::from_ptr(t) }));
        }
        let mut list: Vec<(String, Tensor)> = Vec::new();
        let mut err = std::ptr::null_mut();
        // SAFETY: `visit` does not unwind (it only pushes), ctx lives for the call.
        let status = unsafe { ffi::hookrs_parameters(self.ptr, visit, (&mut list as *mut Vec<(String, Tensor)>).cast(), &mut err) };
        if status != 0 {
            return Err(shim_error(err, "the shim call failed"));
        }
        Ok(list)
    }

    /// The device of each device or tensor constant in the module's graphs.
    pub(crate) fn device_constants(&self) -> Result<Vec<String>> {
        let (mut list, mut err) = (ffi::Strings::EMPTY, std::ptr::null_mut());
        // SAFETY: valid pointers; the shim catches every exception.
        let status = unsafe { ffi::hookrs_device_constants(self.ptr, &mut list, &mut err) };
        if status != 0 {
            return Err(shim_error(err, "the shim call failed"));
        }
        Ok(take_strings(list))
    }

    /// The dtype named by each constant `dtype` argument in the module's graphs.
    pub(crate) fn dtype_constants(&self) -> Result<Vec<String>> {
        let (mut list, mut err) = (ffi::Strings::EMPTY, std::ptr::null_mut());
        // SAFETY: valid pointers; the shim catches every exception.
        let status = unsafe { ffi::hookrs_dtype_constants(self.ptr, &mut list, &mut err) };
        if status != 0 {
            return Err(shim_error(err, "the shim call failed"));
        }
        Ok(take_strings(list))
    }

    /// Converts the tensors and graph constants of dtype `from` to `to` (see the shim's
    /// `retarget_dtype`); returns how many changed.
    pub(crate) fn retarget_dtype(&mut self, from: tch::Kind, to: tch::Kind) -> Result<i64> {
        let (mut changed, mut err) = (0i64, std::ptr::null_mut());
        // SAFETY: valid pointers; the shim catches every exception.
        let status = unsafe { ffi::hookrs_retarget_dtype(self.ptr, scalar_type(from)?, scalar_type(to)?, &mut changed, &mut err) };
        if status != 0 {
            return Err(shim_error(err, "converting the module's dtype failed"));
        }
        Ok(changed)
    }
}
