//! DLPack: tensors handed to and taken from another framework in the same process without a
//! copy (the Python `torch` next to the `hookrs` Python package, which shares this libtorch).
//! A DLPack tensor is a `DLManagedTensor*`: whoever holds it owns it until it is consumed.
//! [`ManagedTensor`] is that ownership as a type: it frees the DLPack tensor when dropped,
//! unless [`ManagedTensor::into_raw`] handed it to a consumer.
//!
//! ```
//! use tch::{Device, Kind, Tensor};
//! let t = Tensor::arange(6, (Kind::Float, Device::Cpu));
//! let managed = hook_torch::dlpack::to_dlpack(&t).unwrap();
//! let back = managed.into_tensor().unwrap();
//! assert_eq!(back.data_ptr(), t.data_ptr()); // the same memory
//! ```

use std::ffi::c_void;

use tch::Tensor;

use crate::error::Result;
use crate::ffi::{self, AtTensor};

/// An owned `DLManagedTensor*`: freed when dropped, unless handed on with
/// [`ManagedTensor::into_raw`] or consumed with [`ManagedTensor::into_tensor`].
#[derive(Debug)]
pub struct ManagedTensor {
    ptr: *mut c_void,
}

// SAFETY: a DLManagedTensor is plain data with a deleter; it may be freed on any thread.
unsafe impl Send for ManagedTensor {}

impl ManagedTensor {
    /// Takes ownership of a `DLManagedTensor*` (a null pointer owns nothing).
    ///
    /// # Safety
    /// `managed` must be a valid, not yet consumed `DLManagedTensor*` (or null) that nobody
    /// else frees.
    pub unsafe fn from_raw(managed: *mut c_void) -> Self {
        ManagedTensor { ptr: managed }
    }

    /// The pointer, for a consumer that takes ownership (a `"dltensor"` capsule): it is no
    /// longer freed here.
    pub fn into_raw(self) -> *mut c_void {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }

    /// The tensor it describes, sharing its memory: the DLPack tensor is consumed (its
    /// deleter runs when the tensor is freed).
    pub fn into_tensor(self) -> Result<Tensor> {
        // SAFETY: `self` owns a valid, unconsumed DLManagedTensor*, consumed once here.
        unsafe { from_dlpack(self.into_raw()) }
    }
}

impl Drop for ManagedTensor {
    fn drop(&mut self) {
        // SAFETY: `ptr` is owned and not consumed (or null).
        unsafe { ffi::hookrs_dlpack_delete(self.ptr) }
    }
}

/// A DLPack view of `t` (shares its memory and keeps it alive).
pub fn to_dlpack(t: &Tensor) -> Result<ManagedTensor> {
    let (mut out, mut err) = (std::ptr::null_mut::<c_void>(), std::ptr::null_mut());
    // SAFETY: `t` outlives the call; the shim only reads it and catches every exception.
    let status = unsafe { ffi::hookrs_to_dlpack(t.as_ptr() as *mut AtTensor, &mut out, &mut err) };
    if status != 0 {
        return Err(crate::script::shim_error(err, "DLPack exchange failed"));
    }
    Ok(ManagedTensor { ptr: out })
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_dlpack_tensor_keeps_its_memory_alive_and_frees_it_once() {
        let t = Tensor::arange(4, (Kind::Float, Device::Cpu));
        let managed = super::to_dlpack(&t).unwrap();
        drop(t);
        let back = managed.into_tensor().unwrap();
        assert_eq!(Vec::<f32>::try_from(&back).unwrap(), vec![0., 1., 2., 3.]);
        // dropped without a consumer: the deleter runs (once) and nothing else holds it
        for _ in 0..100 {
            drop(super::to_dlpack(&back).unwrap());
        }
        assert_eq!(Vec::<f32>::try_from(&back).unwrap(), vec![0., 1., 2., 3.]);
    }
}
