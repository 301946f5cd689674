//! DLPack: tensors handed to and taken from another framework in the same process without a
//! copy (the Python `torch` next to the `hookrs` Python package, which shares this libtorch).
//! A DLPack tensor is a `DLManagedTensor*`: whoever holds it owns it until it is consumed.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! let t = Tensor::arange(6, (Kind::Float, Device::Cpu));
//! let managed = hook_torch::dlpack::to_dlpack(&t).unwrap();
//! // SAFETY: `managed` came from to_dlpack and is consumed once.
//! let back = unsafe { hook_torch::dlpack::from_dlpack(managed) }.unwrap();
//! assert_eq!(back.data_ptr(), t.data_ptr()); // the same memory
//! ```

use std::ffi::c_void;

use tch::Tensor;

use crate::error::Result;
use crate::ffi::{self, AtTensor};

/// A DLPack view of `t` (shares its memory and keeps it alive). The caller owns the returned
/// `DLManagedTensor*`: hand it to a consumer, or free it with [`delete`].
pub fn to_dlpack(t: &Tensor) -> Result<*mut c_void> {
    let (mut out, mut err) = (std::ptr::null_mut::<c_void>(), std::ptr::null_mut());
    // SAFETY: `t` outlives the call; the shim only reads it and catches every exception.
    let status = unsafe { ffi::hookrs_to_dlpack(t.as_ptr() as *mut AtTensor, &mut out, &mut err) };
    if status != 0 {
        return Err(crate::script::shim_error(err, "DLPack exchange failed"));
    }
    Ok(out)
}

/// The tensor a `DLManagedTensor*` describes, sharing its memory; the DLPack tensor is
/// consumed (its deleter runs when the tensor is freed).
///
/// # Safety
/// `managed` must be a valid, not yet consumed `DLManagedTensor*`.
pub unsafe fn from_dlpack(managed: *mut c_void) -> Result<Tensor> {
    let (mut out, mut err) = (std::ptr::null_mut::<AtTensor>(), std::ptr::null_mut());
    // SAFETY: the caller guarantees `managed`; the shim catches every exception.
    let status = unsafe { ffi::hookrs_from_dlpack(managed, &mut out, &mut err) };
    if status != 0 {
        return Err(crate::script::shim_error(err, "DLPack exchange failed"));
    }
    // SAFETY: on success `out` is a heap at::Tensor* whose ownership moves to us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Frees a `DLManagedTensor*` nobody consumed.
///
/// # Safety
/// `managed` must be a valid, not yet consumed `DLManagedTensor*` (or null).
pub unsafe fn delete(managed: *mut c_void) {
    // SAFETY: guaranteed by the caller.
    unsafe { ffi::hookrs_dlpack_delete(managed) }
}
