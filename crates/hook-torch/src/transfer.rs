//! Copies of a cache from a GPU to host memory that run beside the next forward pass.
//!
//! [`to_host_async`] queues every device tensor of a cache into pinned host memory on a
//! **side stream** of its device: the side stream first waits for the work already queued on
//! the compute stream (so the copies read finished values), then copies while the compute
//! stream runs whatever is queued next — typically the next batch. Nothing blocks the host
//! until [`HostCopy::wait`], which synchronises once per device for the whole cache, never per
//! site. The source tensors are kept alive until the copies are complete, so the caching
//! allocator cannot give their memory to the next batch while it is being read.
//!
//! Tensors already in host memory are shared as they are, so on the CPU this is free:
//!
//! ```
//! use hook_cache::ActivationCache;
//! use tch::{Device, Kind, Tensor};
//! let mut c = ActivationCache::new();
//! c.insert("resid_out_0", Tensor::ones([1, 2], (Kind::Float, Device::Cpu)));
//! let host = hook_torch::transfer::to_host_async(&c).unwrap().wait().unwrap();
//! assert_eq!(host.tensor("resid_out_0").unwrap().data_ptr(), c.tensor("resid_out_0").unwrap().data_ptr());
//! ```

use std::ffi::c_void;

use hook_cache::ActivationCache;
use tch::{Device, Tensor};

use crate::error::Result;
use crate::ffi::{self, AtTensor};

/// A cache whose copies to host memory may still be running (see [`to_host_async`]).
#[must_use = "the copies are only complete after wait()"]
pub struct HostCopy {
    cache: ActivationCache,
    /// One shim handle per device involved: its completion event and the sources it reads.
    pending: Vec<Pending>,
}

/// An owned `HostCopy*` of the shim; dropping it waits for the copies, then frees.
struct Pending(*mut c_void);

// SAFETY: the handle is an event plus tensors; c10 events and tensors may be used and freed
// from any thread.
unsafe impl Send for Pending {}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: the pointer came from hookrs_host_copy and is freed exactly once, here.
        unsafe { ffi::hookrs_host_copy_free(self.0) }
    }
}

impl HostCopy {
    /// Waits for the copies (one synchronisation per device involved) and returns the cache,
    /// every tensor in host memory.
    pub fn wait(self) -> Result<ActivationCache> {
        for p in &self.pending {
            let mut err = std::ptr::null_mut();
            // SAFETY: `p.0` is a live handle; the shim catches every exception.
            let status = unsafe { ffi::hookrs_host_copy_wait(p.0, &mut err) };
            if status != 0 {
                return Err(crate::script::shim_error(err, "waiting for the copy to host memory failed"));
            }
        }
        Ok(self.cache)
    }
}

/// Starts copying every tensor of `cache` that is not in host memory into pinned host memory
/// on a side stream of its device, without waiting; read the result through
/// [`HostCopy::wait`]. See the [module documentation](self).
pub fn to_host_async(cache: &ActivationCache) -> Result<HostCopy> {
    // the device tensors in the cache's fixed visiting order, grouped by device
    let mut by_device: Vec<(Device, Vec<Tensor>)> = Vec::new();
    let mut order: Vec<(usize, usize)> = Vec::new();
    cache.map_tensors(|t| {
        let d = t.device();
        if d != Device::Cpu {
            let g = match by_device.iter().position(|(x, _)| *x == d) {
                Some(g) => g,
                None => {
                    by_device.push((d, Vec::new()));
                    by_device.len() - 1
                }
            };
            order.push((g, by_device[g].1.len()));
            by_device[g].1.push(t.shallow_clone());
        }
        Ok(t.shallow_clone())
    })?;
    let mut pending = Vec::new();
    let mut copies: Vec<Vec<Option<Tensor>>> = Vec::new();
    for (_, sources) in &by_device {
        let (handle, dsts) = side_stream_copy(sources)?;
        pending.push(handle);
        copies.push(dsts.into_iter().map(Some).collect());
    }
    let mut next = order.into_iter();
    let host = cache.map_tensors(|t| {
        if t.device() == Device::Cpu {
            return Ok(t.shallow_clone());
        }
        let (g, i) = next.next().expect("the same tensors are visited in the same order");
        Ok(copies[g][i].take().expect("each copy is used once"))
    })?;
    Ok(HostCopy { cache: host, pending })
}

/// One shim call: `sources` (all on one non-CPU device) into pinned host tensors.
fn side_stream_copy(sources: &[Tensor]) -> Result<(Pending, Vec<Tensor>)> {
    let mut srcs: Vec<*mut AtTensor> = sources.iter().map(|t| t.as_ptr() as *mut AtTensor).collect();
    let mut dsts: Vec<*mut AtTensor> = vec![std::ptr::null_mut(); sources.len()];
    let (mut handle, mut err) = (std::ptr::null_mut::<c_void>(), std::ptr::null_mut());
    // SAFETY: `sources` outlive the call (the shim keeps its own references); `dsts` has room
    // for one pointer per source; the shim catches every exception and writes `dsts` only on
    // success.
    let status =
        unsafe { ffi::hookrs_host_copy(srcs.as_mut_ptr(), srcs.len() as i64, dsts.as_mut_ptr(), &mut handle, &mut err) };
    if status != 0 {
        return Err(crate::script::shim_error(err, "the copy to host memory failed"));
    }
    let handle = Pending(handle);
    // SAFETY: on success each entry is a heap at::Tensor* whose ownership moves to us.
    let dsts = dsts.into_iter().map(|p| unsafe { Tensor::from_ptr(p) }).collect();
    Ok((handle, dsts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn host_tensors_are_shared_and_non_tensor_values_kept() {
        let mut c = ActivationCache::new();
        c.insert("resid_out_0", Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]));
        c.insert("mapping_index", serde_json::json!({"last": [0]}));
        c.insert("pair", hook_cache::CacheValue::List(vec![Tensor::ones([1], (Kind::Float, Device::Cpu)).into()]));
        let host = to_host_async(&c).unwrap().wait().unwrap();
        assert_eq!(host.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
        assert!(host.get("mapping_index").unwrap().same_as(c.get("mapping_index").unwrap()));
        assert_eq!(host.tensor("resid_out_0").unwrap().data_ptr(), c.tensor("resid_out_0").unwrap().data_ptr());
    }

    #[test]
    fn the_shim_refuses_host_tensors_with_an_error_not_an_exception() {
        let t = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let err = side_stream_copy(&[t]).err().expect("host tensors are refused").to_string();
        assert!(err.contains("already in host memory"), "{err}");
    }

    #[test]
    fn a_cache_already_on_the_host_makes_no_shim_call() {
        let c = ActivationCache::new();
        let copy = to_host_async(&c).unwrap();
        assert!(copy.pending.is_empty());
    }
}
