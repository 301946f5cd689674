//! # hookrs-py
//!
//! The native half of the `hookrs` Python package (`python/hookrs/__init__.py` is the other):
//! [`HookedModule`], [`ActivationCache`] and [`ValueWithInfo`] with easyroutine's interface,
//! over hook-torch and hook-cache. Tensors cross to and from the Python `torch` by DLPack
//! (`hook_torch::dlpack`): no copies, one libtorch (the torch wheel's, which the crates link).
//!
//! | here | what it holds |
//! |---|---|
//! | [`HookedModule`] | `load`, `to`, `sites`, `description`, `forward`, `run_with_cache`, `run_with_interventions`, `add_hook` with Python callables |
//! | [`ActivationCache`] | the dictionary surface, `cat`, `register_aggregation`, `deferred_mode`, `add_metadata`, `save`/`load`, `memory_size`, pickling |
//! | [`ValueWithInfo`] | a value with its info string, as easyroutine's |
//! | [`HookHandle`], [`DeferredMode`] | `add_hook`'s handle; `with cache.deferred_mode():` |
//! | `convert` functions | tensors by DLPack, cache values to and from Python objects |
//!
//! Errors: bad input is a `ValueError`, everything else a `RuntimeError`, each with the Rust
//! error's message. PyO3 turns a panic into a Python exception; none is expected.


use hook_cache::CacheValue;
use hook_core::TokenGroups;
use hook_torch::{ExtractionConfig, TorchError};
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyDict, PyList, PyTuple};
use tch::Tensor;

// ---- errors ---------------------------------------------------------------------------------

fn torch_err(e: TorchError) -> PyErr {
    match e {
        TorchError::Input(_) | TorchError::Description(_) | TorchError::UnknownComponent { .. } | TorchError::Core(_) | TorchError::Ops(_) => {
            PyValueError::new_err(e.to_string())
        }
        TorchError::Cache(c) => cache_err(c),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn cache_err(e: hook_cache::CacheError) -> PyErr {
    match e {
        hook_cache::CacheError::Io { .. } => PyRuntimeError::new_err(e.to_string()),
        other => PyValueError::new_err(other.to_string()),
    }
}

// ---- tensors by DLPack ----------------------------------------------------------------------

const DLTENSOR: &std::ffi::CStr = c"dltensor";
const USED_DLTENSOR: &std::ffi::CStr = c"used_dltensor";

/// The `torch.Tensor` `obj` as a tch tensor sharing its memory (detached from autograd).
fn tensor_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let py = obj.py();
    let torch = py.import("torch")?;
    if !obj.is_instance(&torch.getattr("Tensor")?)? {
        return Err(PyTypeError::new_err(format!("expected a torch.Tensor, got {}", obj.get_type().name()?)));
    }
    let capsule = py.import("torch.utils.dlpack")?.call_method1("to_dlpack", (obj.call_method0("detach")?,))?;
    let capsule = capsule.downcast::<PyCapsule>()?;
    let managed = capsule.pointer();
    // SAFETY: a "dltensor" capsule from torch holds an unconsumed DLManagedTensor*; renaming
    // it to "used_dltensor" tells torch's destructor it was consumed (the DLPack protocol).
    let t = unsafe { hook_torch::dlpack::from_dlpack(managed) }.map_err(torch_err)?;
    // SAFETY: `capsule` is a live capsule object; the name is a 'static C string.
    unsafe { pyo3::ffi::PyCapsule_SetName(capsule.as_ptr(), USED_DLTENSOR.as_ptr()) };
    Ok(t)
}

unsafe extern "C" fn dltensor_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by Python on a capsule made in `tensor_to_py`; only an unconsumed one
    // (still named "dltensor") owns its DLManagedTensor.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let p = pyo3::ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr());
            drop(hook_torch::dlpack::ManagedTensor::from_raw(p));
        }
    }
}

/// `t` as a `torch.Tensor` sharing its memory.
fn tensor_to_py(py: Python<'_>, t: &Tensor) -> PyResult<PyObject> {
    let managed = hook_torch::dlpack::to_dlpack(t).map_err(torch_err)?.into_raw();
    // SAFETY: `managed` is an owned DLManagedTensor*; the capsule owns it until torch consumes it.
    let capsule = unsafe { pyo3::ffi::PyCapsule_New(managed, DLTENSOR.as_ptr(), Some(dltensor_destructor)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made: nobody else holds `managed`.
        drop(unsafe { hook_torch::dlpack::ManagedTensor::from_raw(managed) });
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference we own.
    let capsule = unsafe { Bound::from_owned_ptr(py, capsule) };
    Ok(py.import("torch.utils.dlpack")?.call_method1("from_dlpack", (capsule,))?.unbind())
}

// ---- cache values ---------------------------------------------------------------------------

fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<PyObject> {
    Ok(py.import("json")?.call_method1("loads", (v.to_string(),))?.unbind())
}

fn value_to_py(py: Python<'_>, v: &CacheValue) -> PyResult<PyObject> {
    Ok(match v {
        CacheValue::Tensor(t) => tensor_to_py(py, t)?,
        CacheValue::List(items) => PyList::new(py, items.iter().map(|x| value_to_py(py, x)).collect::<PyResult<Vec<_>>>()?)?.into_any().unbind(),
        CacheValue::Tuple(items) => PyTuple::new(py, items.iter().map(|x| value_to_py(py, x)).collect::<PyResult<Vec<_>>>()?)?.into_any().unbind(),
        CacheValue::Map(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, value_to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
        CacheValue::Info { value, info } => Py::new(py, ValueWithInfo { value: value_to_py(py, value)?, info: info.clone() })?.into_any(),
        CacheValue::Data(d) => json_to_py(py, d)?,
    })
}

/// Whether `obj` must keep its Python structure in the cache rather than become JSON: it is
/// or holds a tensor, a value with info, or a tuple (JSON has no tuples, and easyroutine's
/// aggregation treats a tuple differently from a list: `(1, 2)` then `(3, 4)` gives
/// `[(1, 2), (3, 4)]`, where lists give `[1, 2, 3, 4]`).
fn needs_structure(obj: &Bound<'_, PyAny>, tensor_type: &Bound<'_, PyAny>) -> PyResult<bool> {
    if obj.is_instance(tensor_type)? || obj.is_instance_of::<ValueWithInfo>() || obj.is_instance_of::<PyTuple>() {
        return Ok(true);
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        for (_, v) in d.iter() {
            if needs_structure(&v, tensor_type)? {
                return Ok(true);
            }
        }
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        for v in obj.try_iter()? {
            if needs_structure(&v?, tensor_type)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A Python value as a cache value: tensors, values with info, tuples, and lists / dicts
/// holding them keep their structure; anything else is stored as JSON data.
fn value_from_py(obj: &Bound<'_, PyAny>) -> PyResult<CacheValue> {
    let py = obj.py();
    let tensor_type = py.import("torch")?.getattr("Tensor")?;
    if obj.is_instance(&tensor_type)? {
        return Ok(CacheValue::Tensor(tensor_from_py(obj)?));
    }
    if let Ok(v) = obj.downcast::<ValueWithInfo>() {
        let v = v.borrow();
        return Ok(CacheValue::Info { value: Box::new(value_from_py(v.value.bind(py))?), info: v.info.clone() });
    }
    if needs_structure(obj, &tensor_type)? {
        if let Ok(d) = obj.downcast::<PyDict>() {
            let mut m = indexmap::IndexMap::new();
            for (k, v) in d.iter() {
                let k: String = k.extract().map_err(|_| PyValueError::new_err("a dict in a cache value needs string keys"))?;
                m.insert(k, value_from_py(&v)?);
            }
            return Ok(CacheValue::Map(m));
        }
        let items = obj.try_iter()?.map(|v| value_from_py(&v?)).collect::<PyResult<Vec<_>>>()?;
        return Ok(if obj.is_instance_of::<PyTuple>() { CacheValue::Tuple(items) } else { CacheValue::List(items) });
    }
    let text: String = py.import("json")?.call_method1("dumps", (obj,)).map_err(|_| {
        PyValueError::new_err(format!(
            "cannot store a {} in an ActivationCache: it takes torch tensors, ValueWithInfo, lists, tuples and dicts of them, and JSON values",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?
    .extract()?;
    Ok(CacheValue::Data(serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))?))
}

// ---- ValueWithInfo --------------------------------------------------------------------------

/// easyroutine's `ValueWithInfo`: a value and the string that describes it.
#[pyclass(module = "hookrs._native")]
pub struct ValueWithInfo {
    value: PyObject,
    info: String,
}

#[pymethods]
impl ValueWithInfo {
    #[new]
    fn new(value: PyObject, info: String) -> Self {
        Self { value, info }
    }

    /// The value.
    #[pyo3(name = "value")]
    fn get_value(&self, py: Python<'_>) -> PyObject {
        self.value.clone_ref(py)
    }

    /// The info string.
    #[pyo3(name = "info")]
    fn get_info(&self) -> String {
        self.info.clone()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("ValueWithInfo(value={}, info={:?})", self.value.bind(py).repr()?, self.info))
    }
}

// ---- ActivationCache ------------------------------------------------------------------------

/// easyroutine's `ActivationCache`, backed by hook-cache (the same semantics as the Rust API).
#[pyclass(module = "hookrs._native", unsendable)]
pub struct ActivationCache {
    inner: hook_cache::ActivationCache,
}

#[pymethods]
impl ActivationCache {
    #[new]
    fn new() -> Self {
        Self { inner: hook_cache::ActivationCache::new() }
    }

    fn __getitem__(&self, py: Python<'_>, key: &str) -> PyResult<PyObject> {
        match self.inner.get(key) {
            Some(v) => value_to_py(py, v),
            None => Err(PyKeyError::new_err(key.to_string())),
        }
    }

    fn __setitem__(&mut self, key: String, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = value_from_py(value)?;
        self.inner.insert(key, v);
        Ok(())
    }

    fn __delitem__(&mut self, key: &str) -> PyResult<()> {
        self.inner.remove(key).map(|_| ()).ok_or_else(|| PyKeyError::new_err(key.to_string()))
    }

    fn __contains__(&self, key: &str) -> bool {
        self.inner.contains(key)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __iter__(slf: PyRef<'_, Self>, py: Python<'_>) -> PyResult<PyObject> {
        Ok(PyList::new(py, slf.inner.keys().collect::<Vec<_>>())?.try_iter()?.into_any().unbind())
    }

    /// The keys, in insertion order.
    fn keys(&self) -> Vec<String> {
        self.inner.keys().map(String::from).collect()
    }

    /// The values, in key order.
    fn values(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.inner.iter().map(|(_, v)| value_to_py(py, v)).collect()
    }

    /// `(key, value)` pairs, in key order.
    fn items(&self, py: Python<'_>) -> PyResult<Vec<(String, PyObject)>> {
        self.inner.iter().map(|(k, v)| Ok((k.to_string(), value_to_py(py, v)?))).collect()
    }

    /// Stores `value` with an info string (easyroutine's `add_with_info`).
    fn add_with_info(&mut self, key: String, value: &Bound<'_, PyAny>, info: String) -> PyResult<()> {
        let v = value_from_py(value)?;
        self.inner.add_with_info(key, v, info);
        Ok(())
    }

    /// Joins another batch's cache into this one with the aggregation rules (tensors
    /// concatenated on the batch axis); a refused `cat` leaves the cache as it was.
    fn cat(&mut self, other: PyRef<'_, ActivationCache>) -> PyResult<()> {
        self.inner.cat(other.inner.clone()).map_err(cache_err)
    }

    /// `{key}` entries keyed by their suffix, as easyroutine's `map_to_dict`.
    fn map_to_dict(&self, py: Python<'_>, key: &str) -> PyResult<PyObject> {
        let m = self.inner.map_to_dict(key).map_err(cache_err)?;
        let d = PyDict::new(py);
        for (k, t) in m {
            d.set_item(k, tensor_to_py(py, &t)?)?;
        }
        Ok(d.into_any().unbind())
    }

    /// Aggregates keys starting with `key` with `function(old, new) -> aggregated` in later
    /// `cat` calls (easyroutine's `register_aggregation`); `old` is None for the first batch.
    /// An exception inside it fails that `cat` with its message, and the cache is unchanged.
    fn register_aggregation(&mut self, key: String, function: PyObject) -> PyResult<()> {
        Python::with_gil(|py| {
            if !function.bind(py).is_callable() {
                return Err(PyTypeError::new_err("register_aggregation takes a callable (old, new) -> aggregated"));
            }
            Ok(())
        })?;
        let f = move |old: Option<CacheValue>, new: CacheValue| -> Result<CacheValue, String> {
            Python::with_gil(|py| {
                let old = match old {
                    Some(v) => value_to_py(py, &v)?,
                    None => py.None(),
                };
                let r = function.call1(py, (old, value_to_py(py, &new)?))?;
                value_from_py(r.bind(py))
            })
            .map_err(|e: PyErr| format!("the aggregation function raised {e}"))
        };
        self.inner.register_aggregation(key, hook_cache::Aggregation::Custom(std::sync::Arc::new(f)));
        Ok(())
    }

    /// `with cache.deferred_mode():` — batches given to `cat` inside the block are kept and
    /// aggregated once, when it ends (easyroutine's deferred mode).
    fn deferred_mode(slf: Py<Self>) -> DeferredMode {
        DeferredMode { cache: slf }
    }

    /// Stores `metadata`: target token positions, model name, extraction config and
    /// interventions (easyroutine's `add_metadata`; values that are not JSON are stored as
    /// their `str`).
    #[pyo3(signature = (target_token_positions, model_name, extraction_config=None, interventions=None))]
    fn add_metadata(
        &mut self,
        py: Python<'_>,
        target_token_positions: &Bound<'_, PyAny>,
        model_name: &str,
        extraction_config: Option<&Bound<'_, PyAny>>,
        interventions: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let json = |v: Option<&Bound<'_, PyAny>>| -> PyResult<serde_json::Value> {
            let Some(v) = v else { return Ok(serde_json::Value::Null) };
            let v = if v.hasattr("to_dict")? { v.call_method0("to_dict")? } else { v.clone() };
            let kwargs = PyDict::new(py);
            kwargs.set_item("default", py.import("builtins")?.getattr("str")?)?;
            let text: String = py.import("json")?.call_method("dumps", (v,), Some(&kwargs))?.extract()?;
            serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))
        };
        self.inner
            .add_metadata(json(Some(target_token_positions))?, model_name, json(extraction_config)?, json(interventions)?)
            .map_err(cache_err)
    }

    /// Human-readable size of one key or of everything.
    #[pyo3(signature = (key=None))]
    fn memory_size(&self, key: Option<&str>) -> String {
        self.inner.memory_size(key)
    }

    /// The memory report (per key, or grouped by key family).
    #[pyo3(signature = (grouped=false))]
    fn memory_tree(&self, grouped: bool) -> String {
        self.inner.memory_report(grouped)
    }

    /// Saves as safetensors (Python's `load_cache.py` and the CLI read it).
    fn save(&self, path: &str) -> PyResult<()> {
        self.inner.save(path).map_err(cache_err)
    }

    /// Loads a file or a chunk directory written by `hookrs extract`.
    #[staticmethod]
    fn load(path: &str) -> PyResult<Self> {
        Ok(Self { inner: hook_cache::ActivationCache::load(path).map_err(cache_err)? })
    }

    fn __getstate__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.inner.to_safetensors_bytes().map_err(cache_err)?))
    }

    fn __setstate__(&mut self, state: &[u8]) -> PyResult<()> {
        self.inner = hook_cache::ActivationCache::from_safetensors_bytes(state).map_err(cache_err)?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("ActivationCache({} keys, {})", self.inner.len(), self.inner.memory_size(None))
    }
}

/// The context manager `ActivationCache.deferred_mode()` returns.
#[pyclass(module = "hookrs._native", unsendable)]
pub struct DeferredMode {
    cache: Py<ActivationCache>,
}

#[pymethods]
impl DeferredMode {
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<ActivationCache>> {
        self.cache.borrow_mut(py).inner.start_deferred().map_err(cache_err)?;
        Ok(self.cache.clone_ref(py))
    }

    /// Aggregates the collected batches (also when the block raised: nothing is lost).
    fn __exit__(&self, py: Python<'_>, _t: PyObject, _v: PyObject, _tb: PyObject) -> PyResult<bool> {
        self.cache.borrow_mut(py).inner.finish_deferred().map_err(cache_err)?;
        Ok(false)
    }
}

// ---- HookedModule ---------------------------------------------------------------------------

/// A TorchScript export instrumented for hooks (`cargo xtask export`).
#[pyclass(module = "hookrs._native", unsendable)]
pub struct HookedModule {
    inner: hook_torch::HookedModule,
    /// The exception a Python hook raised in the current forward, re-raised after it.
    raised: Raised,
}

/// Where a Python hook leaves its exception for the forward's caller.
type Raised = std::sync::Arc<std::sync::Mutex<Option<PyErr>>>;

/// A handle to a hook added with `HookedModule.add_hook`; pass it to `remove_hook`.
#[pyclass(module = "hookrs._native")]
pub struct HookHandle {
    inner: hook_torch::HookHandle,
    site: String,
}

#[pymethods]
impl HookHandle {
    fn __repr__(&self) -> String {
        format!("HookHandle({:?})", self.site)
    }
}

/// A Python callable as a hook: called with the site's tensor (a `torch.Tensor` sharing its
/// memory); a returned tensor replaces it, `None` keeps it (in-place edits then stand). An
/// exception is kept in `raised` and fails the forward.
fn python_hook(function: PyObject, raised: Raised) -> impl hook_core::Hook<Tensor> + Send + 'static {
    move |ctx: &hook_core::HookContext<'_>, io: &hook_core::HookIo<Tensor>| -> hook_core::Result<Option<Tensor>> {
        let x = io.main_tensor()?;
        let result = Python::with_gil(|py| -> PyResult<Option<Tensor>> {
            let r = function.call1(py, (tensor_to_py(py, x)?,))?;
            if r.is_none(py) {
                return Ok(None);
            }
            tensor_from_py(r.bind(py)).map(Some).map_err(|e| PyTypeError::new_err(format!("the hook must return a torch.Tensor or None: {e}")))
        });
        result.map_err(|e| {
            let message = Python::with_gil(|py| e.value(py).repr().map(|r| r.to_string()).unwrap_or_else(|_| e.to_string()));
            *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            hook_core::CoreError::hook_message(ctx.component.to_string(), format!("the Python hook raised {message}"))
        })
    }
}

impl HookedModule {
    /// The error of a failed forward: the Python exception a hook raised (with its
    /// traceback), else the engine's.
    fn failed(&self, e: TorchError) -> PyErr {
        match self.raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(raised) => raised,
            None => torch_err(e),
        }
    }

    /// `hookrs.Intervention`s (resolved against the description and the batch's length) or
    /// engine dicts, as hook-torch interventions.
    fn interventions(&self, py: Python<'_>, list: Option<&Bound<'_, PyAny>>, ids: &Tensor) -> PyResult<Vec<hook_torch::Intervention>> {
        let Some(list) = list else { return Ok(Vec::new()) };
        let seq = ids.size().last().copied().unwrap_or(0);
        let mut desc = None;
        let mut out = Vec::new();
        for item in list.try_iter()? {
            let item = item?;
            if item.is_instance_of::<PyDict>() {
                out.push(intervention_from_py(&item)?);
            } else {
                if desc.is_none() {
                    desc = Some(self.description(py)?);
                }
                out.push(intervention_from_py(&item.call_method1("to_dict", (desc.as_ref().expect("set above"), seq))?)?);
            }
        }
        Ok(out)
    }

    fn inputs(input_ids: &Bound<'_, PyAny>, attention_mask: Option<&Bound<'_, PyAny>>) -> PyResult<(Tensor, Tensor)> {
        let ids = tensor_from_py(input_ids)?;
        let mask = match attention_mask {
            Some(m) => tensor_from_py(m)?,
            None => ids.ones_like(),
        };
        Ok((ids, mask))
    }
}

fn token_groups(py: Python<'_>, groups: Option<&Bound<'_, PyAny>>) -> PyResult<TokenGroups> {
    let Some(g) = groups else { return Ok(TokenGroups::last()) };
    let text: String = py.import("json")?.call_method1("dumps", (g,))?.extract()?;
    serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("token_groups must be lists of positions such as [[0, 1], [-1]]: {e}")))
}

/// A model dtype given as a name (`"bfloat16"`) or a `torch.dtype`.
fn model_kind(dtype: &Bound<'_, PyAny>) -> PyResult<tch::Kind> {
    let name = dtype.str()?.to_string();
    let name = name.strip_prefix("torch.").unwrap_or(&name);
    let name = match name {
        "float" => "float32",
        "half" => "float16",
        n => n,
    };
    hook_torch::description::kind_of(name).ok_or_else(|| PyValueError::new_err(format!("dtype {name:?}: expected float32, bfloat16 or float16")))
}

fn extraction_config(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<ExtractionConfig> {
    let Some(c) = config else { return Ok(ExtractionConfig::default()) };
    let c = if c.hasattr("to_dict")? { c.call_method0("to_dict")? } else { c.clone() };
    let text: String = py.import("json")?.call_method1("dumps", (c,))?.extract()?;
    serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("ExtractionConfig: {e}")))
}

#[pymethods]
impl HookedModule {
    /// Loads and instruments an export on `device` (`cpu`, `cuda`, `cuda:N`), converted to
    /// `dtype` when given (`"float32"`, `"bfloat16"`, `"float16"`, or a `torch.dtype`).
    #[staticmethod]
    #[pyo3(signature = (path, device="cpu", dtype=None))]
    fn load(path: &str, device: &str, dtype: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let device = hook_torch::backend::parse_device(device).map_err(torch_err)?;
        let mut inner = hook_torch::HookedModule::load(path, device).map_err(torch_err)?;
        if let Some(d) = dtype {
            inner.to_kind(model_kind(d)?).map_err(torch_err)?;
        }
        Ok(Self { inner, raised: Default::default() })
    }

    /// `model.to(dtype)`: converts the weights and the graphs' dtype constants (see `load`).
    fn to(&mut self, dtype: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.to_kind(model_kind(dtype)?).map_err(torch_err)
    }

    /// Every hookable site: dicts of component, kind and layer.
    fn sites(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.inner
            .sites()
            .iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("component", &s.component)?;
                d.set_item("kind", format!("{:?}", s.kind))?;
                d.set_item("layer", s.layer)?;
                Ok(d.into_any().unbind())
            })
            .collect()
    }

    /// The model description the exporter stored (sizes, component templates, layout facts).
    #[getter]
    fn description(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = self.inner.require_description().map_err(torch_err)?;
        json_to_py(py, &serde_json::to_value(d).map_err(|e| PyRuntimeError::new_err(e.to_string()))?)
    }

    /// The logits of a forward pass (with the hooks added by `add_hook`).
    #[pyo3(signature = (input_ids, attention_mask=None))]
    fn forward(&mut self, py: Python<'_>, input_ids: &Bound<'_, PyAny>, attention_mask: Option<&Bound<'_, PyAny>>) -> PyResult<PyObject> {
        let (ids, mask) = Self::inputs(input_ids, attention_mask)?;
        let inner = &mut self.inner;
        // the GIL is released while libtorch runs (Python hooks take it back): autograd refuses to run under it
        let logits = py.allow_threads(move || tch::no_grad(|| inner.forward(&ids, &mask))).map_err(|e| self.failed(e))?;
        tensor_to_py(py, &logits)
    }

    /// Adds `function(tensor) -> tensor | None` on a site (`model.layers[0].mlp.output`; see
    /// `sites()`). It runs in every later forward until removed; a returned tensor of another
    /// shape, or an exception, fails that forward (the exception is re-raised with its
    /// traceback) and the module stays usable.
    fn add_hook(&mut self, py: Python<'_>, site: &str, function: PyObject) -> PyResult<HookHandle> {
        if !function.bind(py).is_callable() {
            return Err(PyTypeError::new_err(format!("add_hook({site:?}, ...): expected a callable (tensor) -> tensor or None")));
        }
        let h = self.inner.add_hook(site, python_hook(function, self.raised.clone())).map_err(torch_err)?;
        Ok(HookHandle { inner: h, site: site.to_string() })
    }

    /// Removes a hook; False when it was already removed.
    fn remove_hook(&mut self, handle: PyRef<'_, HookHandle>) -> bool {
        self.inner.remove_hook(handle.inner)
    }

    /// Removes every hook.
    fn clear_hooks(&mut self) {
        self.inner.clear_hooks()
    }

    /// easyroutine's forward with an ExtractionConfig: `(logits, cache)`. `token_groups` are
    /// easyroutine's lists of positions (`[[0, 1], [-1]]`, negative from the end; default the
    /// last token); `config` an `hookrs.ExtractionConfig` or a dict of its fields.
    /// `interventions` (as in `run_with_interventions`) are active during the extraction;
    /// `vocabulary_index` is the logit `keep_gradient` differentiates (easyroutine's).
    #[pyo3(signature = (input_ids, attention_mask=None, token_groups=None, config=None, interventions=None, vocabulary_index=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_with_cache(
        &mut self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        attention_mask: Option<&Bound<'_, PyAny>>,
        token_groups: Option<&Bound<'_, PyAny>>,
        config: Option<&Bound<'_, PyAny>>,
        interventions: Option<&Bound<'_, PyAny>>,
        vocabulary_index: Option<i64>,
    ) -> PyResult<(PyObject, ActivationCache)> {
        let (ids, mask) = Self::inputs(input_ids, attention_mask)?;
        let groups = self::token_groups(py, token_groups)?;
        let config = extraction_config(py, config)?;
        let ivs = self.interventions(py, interventions, &ids)?;
        let inner = &mut self.inner;
        let out = py
            .allow_threads(move || {
                let extraction = hook_torch::Extraction { vocabulary_index, ..hook_torch::Extraction::new(&groups, &config) };
                inner.run(&ids, &mask, hook_torch::RunSpec { extraction: Some(extraction), interventions: &ivs, ..Default::default() })
            })
            .map_err(|e| self.failed(e))?;
        let logits = out.logits.expect("an extraction without stop_early runs to the end");
        Ok((tensor_to_py(py, &logits)?, ActivationCache { inner: out.cache }))
    }

    /// The logits with interventions active for this forward only. `interventions` are
    /// `hookrs.Intervention`s (easyroutine's form), or dicts of the engine's form:
    /// `{"kind": "resid", "component": ..., "positions": [...], "patch": tensor | None}`,
    /// `{"kind": "qkv", "which": "queries"|"keys"|"values", "layer", "head", "positions", "patch"}`,
    /// `{"kind": "attn", "layer", "head", "q_positions", "k_positions", "multiplication_value",
    /// "apply_softmax", "patch"}`, `{"kind": "heads", "layer", "heads": [...]}`.
    #[pyo3(signature = (input_ids, attention_mask=None, interventions=None))]
    fn run_with_interventions(
        &mut self,
        py: Python<'_>,
        input_ids: &Bound<'_, PyAny>,
        attention_mask: Option<&Bound<'_, PyAny>>,
        interventions: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyObject> {
        let (ids, mask) = Self::inputs(input_ids, attention_mask)?;
        let ivs = self.interventions(py, interventions, &ids)?;
        let inner = &mut self.inner;
        let logits = py.allow_threads(move || inner.run_with_interventions(&ids, &mask, &ivs)).map_err(|e| self.failed(e))?;
        tensor_to_py(py, &logits)
    }

    /// Generates after each prompt with a KV cache (a prefill, then one cached step per new
    /// token), `batch_size` prompts side by side (left padded, each row stopping at its own
    /// `eos` or at `max_new_tokens`); greedy when `temperature` is 0, else sampled (top_k,
    /// top_p, seeded). `prompts`: one list of token ids or a list of them. Returns the new
    /// tokens of each prompt (a list of lists; one list for one prompt).
    ///
    /// `steering`: `{"layer": l, "vector": tensor [d_model], "scale": 1.0, "at": "new"}` adds
    /// the vector to layer l's output (`resid_out`) at every position of the forwards `at`
    /// names: `"prompt"` (the prefill), `"new"` (each generated token's step: the first new
    /// token is read at the unsteered prompt) or `"all"`. `interventions` (as in
    /// `run_with_interventions`) apply at the forwards `interventions_at` names, their
    /// positions counting in each forward's tokens (the prompt's, then the one new token's).
    /// With `extraction_config`, returns `(tokens, caches)`: for each batch, one
    /// ActivationCache per new token holding the activations that produced it (the prompt's
    /// last position, then each fed-back token). `max_prefill_tokens` (rows x columns per
    /// forward) feeds a long prompt in pieces, so its activations stay small (0: at once).
    #[pyo3(signature = (prompts, max_new_tokens=16, temperature=0.0, top_k=None, top_p=None, seed=0, eos=None, pad=0, batch_size=8,
                        max_prefill_tokens=hook_analysis::generate::DEFAULT_MAX_PREFILL_TOKENS, steering=None, interventions=None, interventions_at="all", extraction_config=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &mut self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
        eos: Option<i64>,
        pad: i64,
        batch_size: usize,
        max_prefill_tokens: usize,
        steering: Option<&Bound<'_, PyDict>>,
        interventions: Option<&Bound<'_, PyAny>>,
        interventions_at: &str,
        extraction_config: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyObject> {
        use hook_analysis::{Apply, Edits, GenerateOptions, Steering};
        let apply = |what: &str, v: &str| match v {
            "prompt" => Ok(Apply::Prompt),
            "new" => Ok(Apply::NewTokens),
            "all" => Ok(Apply::All),
            other => Err(PyValueError::new_err(format!("{what}={other:?}: expected \"prompt\", \"new\" or \"all\""))),
        };
        let one: Option<Vec<i64>> = prompts.extract().ok();
        let list: Vec<Vec<i64>> = match &one {
            Some(p) => vec![p.clone()],
            None => prompts.extract().map_err(|_| PyTypeError::new_err("prompts: expected a list of token ids or a list of such lists"))?,
        };
        let steering = match steering {
            None => None,
            Some(d) => {
                let get = |k: &str| d.get_item(k);
                let layer: usize = get("layer")?.ok_or_else(|| PyValueError::new_err("steering needs \"layer\""))?.extract()?;
                let vector = tensor_from_py(&get("vector")?.ok_or_else(|| PyValueError::new_err("steering needs \"vector\""))?)?;
                let scale: f64 = get("scale")?.map(|v| v.extract()).transpose()?.unwrap_or(1.0);
                let at: String = get("at")?.map(|v| v.extract()).transpose()?.unwrap_or_else(|| "new".into());
                for k in d.keys() {
                    let k: String = k.extract()?;
                    if !["layer", "vector", "scale", "at"].contains(&k.as_str()) {
                        return Err(PyValueError::new_err(format!("steering has an unknown key {k:?} (known: layer, vector, scale, at)")));
                    }
                }
                Some(Steering { layer, vector: vector.to_kind(tch::Kind::Float), scale, at: apply("steering at", &at)? })
            }
        };
        let first = Tensor::from_slice(list.first().map(Vec::as_slice).unwrap_or(&[])).view([1, -1]);
        let ivs = self.interventions(py, interventions, &first)?;
        let config = match extraction_config {
            Some(c) => Some(self::extraction_config(py, Some(c))?),
            None => None,
        };
        let o = GenerateOptions { max_new_tokens, temperature, top_k, top_p, seed, eos, pad, batch_size, max_prefill_tokens };
        let interventions_at = apply("interventions_at", interventions_at)?;
        let extracting = config.is_some();
        let inner = &mut self.inner;
        let made = py
            .allow_threads(move || {
                // made here: a tensor is Send, not Sync, so the edits cannot cross by reference
                let edits = Edits { interventions: &ivs, interventions_at, steering: steering.as_ref(), extraction: config.as_ref() };
                hook_analysis::generate(inner, &list, &o, &edits, &mut |_| {})
            })
            .map_err(|e| match e {
            hook_analysis::AnalysisError::Model(t) => self.failed(t),
            hook_analysis::AnalysisError::Input(m) => PyValueError::new_err(m),
            other => PyRuntimeError::new_err(other.to_string()),
        })?;
        let tokens: PyObject = match one {
            Some(_) => made.tokens[0].clone().into_pyobject(py)?.into_any().unbind(),
            None => made.tokens.clone().into_pyobject(py)?.into_any().unbind(),
        };
        if !extracting {
            return Ok(tokens);
        }
        let caches: Vec<Vec<ActivationCache>> = made.caches.into_iter().map(|b| b.into_iter().map(|inner| ActivationCache { inner }).collect()).collect();
        Ok((tokens, caches).into_pyobject(py)?.into_any().unbind())
    }
}

/// One intervention dict (see `run_with_interventions`).
fn intervention_from_py(obj: &Bound<'_, PyAny>) -> PyResult<hook_torch::Intervention> {
    use hook_torch::PatchValue;
    let d = obj.downcast::<PyDict>().map_err(|_| PyTypeError::new_err("an intervention is a dict (hookrs.Intervention(...).to_dict())"))?;
    // the patch values are a tensor (not JSON): the rest goes through Intervention's one parser
    let rest = d.copy()?;
    let patch = match rest.get_item("patch")? {
        Some(v) if !v.is_none() && !v.extract::<String>().is_ok_and(|s| s == "ablation") => {
            rest.del_item("patch")?;
            Some(PatchValue::Values(tensor_from_py(&v)?))
        }
        _ => None,
    };
    let text: String = obj.py().import("json")?.call_method1("dumps", (rest,))?.extract()?;
    let iv: hook_torch::Intervention = serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("intervention {text}: {e}")))?;
    Ok(match patch {
        Some(p) => iv.with_patch(p),
        None => iv,
    })
}

/// Runs an extraction (hook-extract) in this process, the GIL released: `options` is a JSON
/// object of `hookrs.extract`'s keywords (with `model` and `out`); `progress(done, total)` is
/// called as examples complete (`total` None when unknown). An invalid option raises
/// ValueError, a failed run RuntimeError. Returns the run's report as a dict-like JSON text.
#[pyfunction]
#[pyo3(signature = (options, progress=None))]
fn extract(py: Python<'_>, options: &str, progress: Option<PyObject>) -> PyResult<String> {
    let invalid = |e: hook_extract::ExtractError| -> PyErr {
        match e {
            hook_extract::ExtractError::Invalid(m) => PyValueError::new_err(m),
            hook_extract::ExtractError::Failed(e) => PyRuntimeError::new_err(format!("{e:#}")),
        }
    };
    let job = hook_extract::ExtractOptions::from_json(options).and_then(|o| o.validate(|k| std::env::var(k).ok())).map_err(invalid)?;
    let report = py.allow_threads(move || {
        let mut call = |done: u64, total: Option<u64>| {
            if let Some(f) = &progress {
                // a failing progress callback must not stop the run
                Python::with_gil(|py| {
                    let _ = f.call1(py, (done, total));
                });
            }
        };
        hook_extract::run(job, &mut call)
    });
    let r = report.map_err(invalid)?;
    Ok(serde_json::json!({
        "out": r.out, "already_complete": r.already_complete, "resumed_after": r.resumed_after, "examples": r.examples,
        "examples_run": r.examples_run, "tokens": r.tokens, "computed_tokens": r.computed_tokens, "seconds": r.seconds, "chunks": r.chunks,
    })
    .to_string())
}

/// Installs hookrs's memory guard over libtorch's CPU allocator, for this whole process (the
/// user's own torch included: every CPU allocation then takes a mutex and a map insert), and
/// sets its limit: bytes (int), a size ("16GiB", "500MB"), "machine" (90 % of this machine's
/// memory), or None (count, no limit). Past the limit, an allocation is a RuntimeError naming
/// the sizes instead of a visit from the OOM killer. Off unless called. Returns the bytes the
/// CPU tensors allocated since the guard was installed hold now.
#[pyfunction]
fn set_memory_limit(limit: Option<&Bound<'_, PyAny>>) -> PyResult<i64> {
    let (bytes, why) = match limit {
        None => (None, "no limit".to_string()),
        Some(v) => {
            if let Ok(n) = v.extract::<u64>() {
                (Some(n), format!("hookrs.set_memory_limit({n})"))
            } else if let Ok(s) = v.extract::<String>() {
                if s == "machine" {
                    let b = hook_torch::memory::machine_limit().ok_or_else(|| PyRuntimeError::new_err("this machine's memory cannot be read (/proc/meminfo)"))?;
                    (Some(b), "hookrs.set_memory_limit(\"machine\"): 90% of this machine's memory".to_string())
                } else {
                    let b = hook_torch::memory::parse_size(&s)
                        .ok_or_else(|| PyValueError::new_err(format!("memory limit {s:?}: expected bytes, a size such as \"16GiB\" or \"500MB\", \"machine\", or None")))?;
                    (Some(b), format!("hookrs.set_memory_limit({s:?})"))
                }
            } else {
                return Err(PyValueError::new_err("memory limit: expected bytes (int), a size such as \"16GiB\", \"machine\", or None"));
            }
        }
    };
    Ok(hook_torch::memory::set_limit_because(bytes, &why))
}

/// The native module (`hookrs._native`).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HookedModule>()?;
    m.add_class::<ActivationCache>()?;
    m.add_class::<ValueWithInfo>()?;
    m.add_class::<HookHandle>()?;
    m.add_class::<DeferredMode>()?;
    m.add_function(wrap_pyfunction!(extract, m)?)?;
    m.add_function(wrap_pyfunction!(set_memory_limit, m)?)?;
    Ok(())
}
