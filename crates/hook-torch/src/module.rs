//! [`HookedModule`]: a TorchScript causal LM whose every submodule (and attention pattern)
//! can be read and edited during a forward pass.
//!
//! Loading rewrites the module's graphs once (the C++ shim inserts a `hookrs::point(x, site)`
//! op at each site) and hands tch the rewritten module, so the forward pass is tch's own.
//! During a forward, each `hookrs::point` calls back into Rust on the calling thread; a
//! thread-local points at the dispatcher of the forward running on that thread, so two
//! modules on two threads never see each other's hooks, and a site with no hook costs one
//! callback that returns at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use hook_core::{ComponentPath, Hook, HookContext, HookIo, Value};
use tch::{Device, Kind, Tensor};

use crate::description::ModelDescription;
use crate::error::{Result, TorchError};
use crate::reshape::{self, Reshape};
use crate::ffi::{self, AtTensor};
use crate::script::{device_name, Loaded, ScriptModule};
use crate::site::{SiteInfo, SiteKind};

/// A hook stored on a module.
pub type BoxedHook = Box<dyn Hook<Tensor> + Send>;

/// Identifies a hook added with [`HookedModule::add_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookHandle(u64);

type Dispatch<'a> = dyn FnMut(usize, Tensor) -> std::result::Result<Option<Tensor>, ()> + 'a;

thread_local! {
    static ACTIVE: Cell<Option<*mut Dispatch<'static>>> = const { Cell::new(None) };
    /// The site and message of a hook that panicked during this thread's forward.
    static PANIC: RefCell<Option<(usize, String)>> = const { RefCell::new(None) };
}

unsafe extern "C" fn callback(site: i64, x: *mut AtTensor, out: *mut *mut AtTensor) -> c_int {
    // SAFETY: the shim passes a heap `at::Tensor*` whose ownership moves to us.
    let t = unsafe { Tensor::from_ptr(x) };
    unsafe { *out = std::ptr::null_mut() };
    let Some(f) = ACTIVE.with(Cell::get) else {
        return 0; // no forward of ours on this thread: the op is a no-op
    };
    // SAFETY: the pointer is set by `HookedModule::run` for the duration of its forward.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*f)(site as usize, t) }));
    match r {
        Ok(Ok(None)) => 0,
        Ok(Ok(Some(mut new))) => {
            // SAFETY: `out` is the shim's out-parameter, valid for this call; ownership of the
            // tensor moves to the shim (hence the forget below).
            unsafe { *out = new.as_mut_ptr() };
            std::mem::forget(new);
            0
        }
        Ok(Err(())) => 1,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            PANIC.with(|p| *p.borrow_mut() = Some((site as usize, msg)));
            1
        }
    }
}

fn install_callback() {
    static ONCE: Once = Once::new();
    // SAFETY: `callback` is an `extern "C"` function that catches every panic; set once.
    ONCE.call_once(|| unsafe { ffi::hookrs_set_callback(callback) });
}

/// How many hook sites (armed or idle) have run on this thread since it started: a
/// diagnostic that shows how much of a forward ran (e.g. with `RunSpec::stop_early`).
///
/// ```no_run
/// let before = hook_torch::module::site_calls_on_this_thread();
/// // ... a forward pass ...
/// let ran = hook_torch::module::site_calls_on_this_thread() - before;
/// ```
pub fn site_calls_on_this_thread() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { ffi::hookrs_point_calls() }
}

/// How many sites the shim's armed-site table of this thread covers: 0 outside a forward pass
/// (each forward arms its sites and restores the previous table when it returns, errors
/// included). A leak check for soak runs.
///
/// ```
/// assert_eq!(hook_torch::module::armed_sites_on_this_thread(), 0);
/// ```
pub fn armed_sites_on_this_thread() -> usize {
    let (mut prev, mut prev_len) = (std::ptr::null(), 0i64);
    // SAFETY: swaps in an empty table and puts the previous one straight back.
    unsafe {
        ffi::hookrs_set_armed(std::ptr::null(), 0, &mut prev, &mut prev_len);
        ffi::hookrs_set_armed(prev, prev_len, &mut std::ptr::null(), &mut 0);
    }
    if prev.is_null() {
        0
    } else {
        prev_len as usize
    }
}

/// Refuses a device this process cannot use, saying why.
fn check_device(device: Device) -> Result<()> {
    if let Device::Cuda(n) = device {
        let backend = crate::backend::load_gpu_backend();
        let count = tch::Cuda::device_count();
        if (n as i64) >= count {
            let why = if count > 0 {
                format!("this machine has {count} CUDA device(s): use cuda:0..cuda:{}", count - 1)
            } else if let Err(e) = backend {
                format!("libtorch's CUDA backend does not load: {e}")
            } else if !crate::backend::cuda_backend_loaded() {
                "this libtorch has no CUDA backend (libtorch_cuda.so): it is a CPU-only build".to_string()
            } else if crate::backend::cuda_runtime_version().is_none() {
                "libtorch answered a CUDA query before its CUDA backend was loaded (call hook_torch::backend::load_gpu_backend() before tch::Cuda or tch::manual_seed)".to_string()
            } else {
                "libtorch's CUDA backend is loaded but finds no device (no GPU, or no driver): use --device cpu".to_string()
            };
            return Err(TorchError::Device(format!("cuda:{n} is not available: {why}")));
        }
    }
    Ok(())
}

/// This thread's dispatcher and armed-site table for the duration of one forward: set when
/// made, and the previous ones (an outer forward's, or none) put back when dropped, on every
/// way out of the forward (errors and unwinding included).
struct ArmedForward<'t> {
    previous: Option<*mut Dispatch<'static>>,
    prev_table: *const u8,
    prev_len: i64,
    _table: std::marker::PhantomData<&'t [u8]>,
}

impl<'t> ArmedForward<'t> {
    /// Makes `dispatch` this thread's dispatcher and `table` its armed-site table (empty: no
    /// site armed, every site returns in C++).
    fn arm(dispatch: Option<*mut Dispatch<'static>>, table: &'t [u8]) -> Self {
        let previous = ACTIVE.with(|a| a.replace(dispatch));
        let (mut prev_table, mut prev_len) = (std::ptr::null(), 0i64);
        let ptr = if table.is_empty() { std::ptr::null() } else { table.as_ptr() };
        // SAFETY: `table` outlives the guard (its lifetime `'t`); the guard restores the
        // previous table before `table` can go away.
        unsafe { ffi::hookrs_set_armed(ptr, table.len() as i64, &mut prev_table, &mut prev_len) };
        ArmedForward { previous, prev_table, prev_len, _table: std::marker::PhantomData }
    }
}

impl Drop for ArmedForward<'_> {
    fn drop(&mut self) {
        // SAFETY: restores the table that was armed before this forward (still alive: its owner
        // is an outer forward on this thread, or it is null).
        unsafe { ffi::hookrs_set_armed(self.prev_table, self.prev_len, &mut std::ptr::null(), &mut 0) };
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// A TorchScript module instrumented for hooks.
///
/// ```no_run
/// use hook_torch::HookedModule;
/// use tch::{Device, Kind, Tensor};
///
/// let mut m = HookedModule::load("llama.pt", Device::Cpu).unwrap();
/// let ids = Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
/// let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
/// // zero the output of layer 0's attention
/// let h = m.add_hook("model.layers[0].self_attn.output", |_: &hook_core::HookContext, io: &hook_core::HookIo<Tensor>| {
///     Ok(Some(io.main_tensor()?.zeros_like()))
/// }).unwrap();
/// let logits = m.forward(&ids, &mask).unwrap();
/// m.remove_hook(h);
/// ```
pub struct HookedModule {
    module: ScriptModule,
    sites: Vec<SiteInfo>,
    by_path: HashMap<ComponentPath, usize>,
    description: Option<ModelDescription>,
    hooks: Vec<Vec<(u64, BoxedHook)>>,
    next_hook: u64,
    device: Device,
    params: HashMap<String, Tensor>,
    /// graph site id -> index into `sites` (usize::MAX: a site not exposed)
    id_to_index: Vec<usize>,
    /// The archive, and the dtype it was exported in (what [`HookedModule::to_kind`]
    /// converts from).
    path: std::path::PathBuf,
    export_kind: Kind,
    /// A forward has run (graph executors then hold optimized copies of the graphs).
    has_run: bool,
}

impl std::fmt::Debug for HookedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookedModule").field("sites", &self.sites.len()).field("description", &self.description).finish()
    }
}

impl HookedModule {
    /// Loads and instruments a TorchScript file on `device`.
    ///
    /// A module without a `hookrs.json` description loads too (sites come from its module
    /// tree), with a warning: extraction by easyroutine's component templates needs it.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        install_callback();
        let path = path.as_ref();
        let load_err = |reason: String| TorchError::Load { path: path.to_path_buf(), reason };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        check_device(device)?;
        let Loaded { module, sites: raw, description_json: desc_json } = ScriptModule::load(path, device, &device_name(device))?;
        let mut all: Vec<(usize, SiteInfo)> = Vec::new();
        let mut max_id = 0;
        for s in raw {
            max_id = max_id.max(s.id + 1);
            if let Some(info) = SiteInfo::new(s.id, &s.module, &s.kind) {
                all.push((s.id, info));
            }
        }
        let description = if desc_json.trim().is_empty() {
            tracing::warn!(path = %path.display(), "no hookrs.json description in the archive: component templates are unknown; export with `cargo xtask export` to get them");
            None
        } else {
            Some(ModelDescription::from_json(&desc_json)?)
        };
        let mut by_path = HashMap::new();
        let mut sites = Vec::new();
        let mut index_of_id = vec![usize::MAX; max_id];
        for (id, info) in all {
            index_of_id[id] = sites.len();
            by_path.insert(info.path().clone(), sites.len());
            sites.push(info);
        }
        let params = module.parameters()?.into_iter().collect();
        let mut m = HookedModule {
            module,
            hooks: (0..sites.len()).map(|_| Vec::new()).collect(),
            sites,
            by_path,
            description,
            next_hook: 0,
            device,
            params,
            id_to_index: index_of_id,
            path: path.to_path_buf(),
            export_kind: Kind::Float,
            has_run: false,
        };
        m.export_kind = m.kind();
        Ok(m)
    }

    /// The archive the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every hookable site, in module order.
    pub fn sites(&self) -> &[SiteInfo] {
        &self.sites
    }

    /// The model facts stored by the exporter, when the archive has them.
    pub fn description(&self) -> Option<&ModelDescription> {
        self.description.as_ref()
    }

    /// The description, or an error saying extraction needs one.
    pub fn require_description(&self) -> Result<&ModelDescription> {
        self.description.as_ref().ok_or_else(|| {
            TorchError::Description("is missing: this archive has no hookrs.json; re-export it with `cargo xtask export` to use easyroutine component names".into())
        })
    }

    /// The device named by each device or tensor constant in the module's graphs, one entry
    /// per constant. After [`HookedModule::load`] every entry is the module's device, whatever
    /// device the archive was traced on.
    pub fn graph_device_constants(&self) -> Result<Vec<String>> {
        self.module.device_constants()
    }

    /// The dtype named by each constant `dtype` argument in the module's graphs (`Float`,
    /// `BFloat16`, `Half`, `Long`, ...), one entry per use: what tracing baked in, and what
    /// [`HookedModule::to_kind`] rewrites.
    pub fn graph_dtype_constants(&self) -> Result<Vec<String>> {
        self.module.dtype_constants()
    }

    /// The dtype of the weights and activations (float32, bfloat16 or float16): the
    /// description's, else the most common floating dtype of the parameters.
    pub fn kind(&self) -> Kind {
        if let Some(k) = self.description.as_ref().and_then(|d| crate::description::kind_of(&d.dtype)) {
            return k;
        }
        let mut counts: Vec<(Kind, usize)> = Vec::new();
        for t in self.params.values().filter(|t| t.is_floating_point()) {
            match counts.iter_mut().find(|(k, _)| *k == t.kind()) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.kind(), 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k).unwrap_or(Kind::Float)
    }

    /// Converts the module to another dtype, as `model.to(torch.float16)` would: its weights,
    /// and the dtype constants tracing baked into its graphs (`x.to(input_dtype)`, the
    /// attention masks' `torch.finfo(dtype).min`), so an archive exported in one half
    /// precision runs in the other, or in float32. Tensors the export kept in another dtype
    /// on purpose (float32 upcasts in norms and softmax) stay.
    ///
    /// A float32 export cannot be converted to half precision: its graphs do not tell the
    /// computations meant to stay in float32 from those in the model's dtype (both are
    /// float32 there). Export in bfloat16 or float16 instead (`export --dtype`); converting
    /// from either works in every direction, any number of times: after a forward pass or a
    /// first conversion, the module is reloaded from its archive and converted from the
    /// export's dtype (hooks stay attached), because graph executors keep optimized copies of
    /// the graphs that later edits would miss.
    ///
    /// ```no_run
    /// let mut m = hook_torch::HookedModule::load("llama-bf16.pt", tch::Device::Cpu).unwrap();
    /// m.to_kind(tch::Kind::Half).unwrap();
    /// assert!(m.graph_dtype_constants().unwrap().iter().all(|d| d != "BFloat16"));
    /// ```
    pub fn to_kind(&mut self, kind: Kind) -> Result<()> {
        let current = self.kind();
        let Some(to_name) = crate::description::dtype_name(kind) else {
            return Err(TorchError::Input(format!("cannot run a model in {kind:?}: use float32, bfloat16 or float16")));
        };
        if current == kind {
            return Ok(());
        }
        let export = self.export_kind;
        if export == Kind::Float {
            return Err(TorchError::Input(format!(
                "this archive was exported in float32 and cannot be converted to {to_name}: its graphs do not tell the \
                 computations meant to stay in float32 (norm and softmax upcasts) from those in the model's dtype; \
                 export it with `--dtype {to_name}` (or bfloat16/float16: those convert to any dtype)"
            )));
        }
        if current != export || self.has_run {
            // Start again from the archive: its graphs hold the export's own constants (after a
            // conversion to float32 they no longer tell upcasts apart), and no graph executor
            // has optimized a copy of them yet (a forward caches one that later edits miss).
            // Sites are the same, so the hooks stay.
            let Loaded { module, .. } = ScriptModule::load(&self.path, self.device, &device_name(self.device))?;
            self.module = module;
            self.has_run = false;
        }
        if kind != export {
            self.module.retarget_dtype(export, kind)?;
        }
        self.params = self.module.parameters()?.into_iter().collect();
        if let Some(d) = self.description.as_mut() {
            d.dtype = to_name.to_string();
        }
        Ok(())
    }

    /// The device the module runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A parameter by its torch name (`model.layers.0.self_attn.o_proj.weight`).
    pub fn parameter(&self, name: &str) -> Option<&Tensor> {
        self.params.get(name)
    }

    /// The site index of a component, or an error listing the closest names.
    pub fn site_index(&self, component: &str) -> Result<usize> {
        let path: ComponentPath = component.parse()?;
        self.by_path.get(&path).copied().ok_or_else(|| TorchError::UnknownComponent {
            component: component.to_string(),
            suggestions: hook_core::suggest::closest(component, self.sites.iter().map(|s| s.component.as_str()), 5),
        })
    }

    /// Adds a hook on `component`; it runs on every forward until removed.
    pub fn add_hook(&mut self, component: &str, hook: impl Hook<Tensor> + Send + 'static) -> Result<HookHandle> {
        self.add_boxed_hook(component, Box::new(hook))
    }

    /// [`HookedModule::add_hook`] for a hook already boxed (e.g. from [`crate::catalogue`]).
    pub fn add_boxed_hook(&mut self, component: &str, hook: BoxedHook) -> Result<HookHandle> {
        let i = self.site_index(component)?;
        let id = self.next_hook;
        self.next_hook += 1;
        self.hooks[i].push((id, hook));
        Ok(HookHandle(id))
    }

    /// Removes a hook; returns whether it was there.
    pub fn remove_hook(&mut self, handle: HookHandle) -> bool {
        for list in &mut self.hooks {
            if let Some(p) = list.iter().position(|(id, _)| *id == handle.0) {
                list.remove(p);
                return true;
            }
        }
        false
    }

    /// Removes every hook.
    pub fn clear_hooks(&mut self) {
        self.hooks.iter_mut().for_each(Vec::clear);
    }

    /// How many hooks are attached (added with [`HookedModule::add_hook`] and not removed).
    pub fn hook_count(&self) -> usize {
        self.hooks.iter().map(Vec::len).sum()
    }

    /// Checks token ids and mask: `[batch, seq]` int64 ids below the vocabulary size, and a
    /// mask of the same shape with 0/1 values. Returns them on the module's device.
    pub fn check_inputs(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = self.check_ids(input_ids)?;
        if attention_mask.size() != input_ids.size() {
            return Err(TorchError::Input(format!(
                "attention_mask has shape {:?}, expected the shape of input_ids {:?}",
                attention_mask.size(),
                input_ids.size()
            )));
        }
        Ok((ids, self.check_mask(attention_mask)?))
    }

    /// `[batch, seq]` integer token ids below the vocabulary size, as int64 on the module's
    /// device.
    pub(crate) fn check_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let bad = |m: String| TorchError::Input(m);
        if input_ids.dim() != 2 {
            return Err(bad(format!("input_ids has shape {:?}, expected [batch, seq]", input_ids.size())));
        }
        if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(bad(format!("input_ids has dtype {:?}, expected an integer dtype (int64)", input_ids.kind())));
        }
        if input_ids.numel() == 0 {
            return Err(bad("input_ids is empty: expected at least one token".into()));
        }
        let ids = input_ids.f_to_kind(Kind::Int64)?;
        let lo = ids.f_min()?.int64_value(&[]);
        let hi = ids.f_max()?.int64_value(&[]);
        if let Some(d) = &self.description {
            if lo < 0 || hi >= d.vocab_size as i64 {
                let v = if lo < 0 { lo } else { hi };
                return Err(bad(format!("token id {v} is out of the vocabulary: valid ids are 0..{}", d.vocab_size)));
            }
        } else if lo < 0 {
            return Err(bad(format!("token id {lo} is negative")));
        }
        Ok(ids.f_to_device(self.device)?)
    }

    /// A 0/1 attention mask as int64 on the model's device.
    pub(crate) fn check_mask(&self, attention_mask: &Tensor) -> Result<Tensor> {
        let mask = attention_mask.f_to_kind(Kind::Int64)?;
        if mask.numel() > 0 {
            let mlo = mask.f_min()?.int64_value(&[]);
            let mhi = mask.f_max()?.int64_value(&[]);
            if mlo < 0 || mhi > 1 {
                return Err(TorchError::Input(format!("attention_mask holds {}, expected only 0 and 1", if mlo < 0 { mlo } else { mhi })));
            }
        }
        Ok(mask.f_to_device(self.device)?)
    }

    /// The forward pass every public way of running the model ends in
    /// ([`HookedModule::run`]): inputs that [`HookedModule::check_inputs`] returned, the
    /// stored hooks and then `scoped` (for this call only) at each site. With
    /// `stop_when_done`, it stops as soon as every site with a hook has fired once: the
    /// TorchScript forward unwinds (the op throws), nothing after the last hooked site runs,
    /// and `None` comes back instead of the logits. The module stays usable. With `past` (the
    /// cached keys and values of every layer), the archive's cached step runs instead of the
    /// forward, and the new keys and values come back beside the logits.
    pub(crate) fn forward_checked(
        &mut self,
        ids: Tensor,
        mask: Tensor,
        past: Option<&[Tensor]>,
        scoped: Vec<(String, BoxedHook)>,
        stop_when_done: bool,
        reshape: Reshape,
    ) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        let scoped = scoped.into_iter().map(|(c, h)| Ok((self.site_index(&c)?, h))).collect::<Result<Vec<_>>>()?;
        let mut scoped_by_site: Vec<Vec<BoxedHook>> = (0..self.sites.len()).map(|_| Vec::new()).collect();
        for (i, h) in scoped {
            scoped_by_site[i].push(h);
        }
        // The armed-site table the shim checks before crossing into Rust: idle sites return
        // their input in C++.
        let mut armed = vec![0u8; self.id_to_index.len()];
        for (i, site) in self.sites.iter().enumerate() {
            if !self.hooks[i].is_empty() || !scoped_by_site[i].is_empty() || reshape.touches(i) {
                armed[site.id] = 1;
            }
        }
        let any_hooks = armed.iter().any(|&a| a != 0);
        // early stop: the hooked sites that have not fired yet
        let mut waiting = if stop_when_done { armed.iter().filter(|&&a| a != 0).count() } else { usize::MAX };
        let mut fired = vec![false; armed.len()];
        let mut stopped = false;
        self.has_run = true;
        let HookedModule { module, sites, hooks, id_to_index, .. } = self;
        let mut error: Option<TorchError> = None;
        let mut call_index = 0usize;
        let mut dispatch = |site_id: usize, x: Tensor| -> std::result::Result<Option<Tensor>, ()> {
            let Some(&i) = id_to_index.get(site_id) else { return Ok(None) };
            if i == usize::MAX {
                return Ok(None);
            }
            let info = &sites[i];
            let ctx = HookContext { component: info.path(), layer: info.layer, call_index };
            call_index += 1;
            let (stored, extra) = (&mut hooks[i], &mut scoped_by_site[i]);
            if stored.is_empty() && extra.is_empty() && !reshape.touches(i) {
                return Ok(None);
            }
            let mut current = x;
            let mut changed = false;
            if let Some((_, rows)) = reshape.fork.filter(|(s, _)| *s == i) {
                match reshape::fork(&current, rows) {
                    Ok(t) => (current, changed) = (t, true),
                    Err(message) => {
                        error = Some(TorchError::Hook { component: info.component.clone(), message, source: None });
                        return Err(());
                    }
                }
            }
            for hook in stored.iter_mut().map(|(_, h)| h).chain(extra.iter_mut()) {
                let io = match info.kind {
                    SiteKind::Input => HookIo::before(vec![Value::Tensor(current.shallow_clone())], vec![]),
                    _ => HookIo::output_tensor(current.shallow_clone()),
                };
                match hook.call(&ctx, &io) {
                    Ok(None) => {}
                    Ok(Some(new)) => {
                        if new.size() != current.size() {
                            error = Some(TorchError::Hook {
                                component: info.component.clone(),
                                message: format!("the hook returned a tensor of shape {:?}; the activation has shape {:?}", new.size(), current.size()),
                                source: None,
                            });
                            return Err(());
                        }
                        let new = if new.device() != current.device() || new.kind() != current.kind() {
                            match new.f_to_device(current.device()).and_then(|t| t.f_to_kind(current.kind())) {
                                Ok(t) => t,
                                Err(e) => {
                                    error = Some(TorchError::Torch(e));
                                    return Err(());
                                }
                            }
                        } else {
                            new
                        };
                        current = new;
                        changed = true;
                    }
                    Err(e) => {
                        // the site names the component; the hook's own error is the source
                        let (message, source): (String, Option<Box<dyn std::error::Error + Send + Sync>>) = match e {
                            hook_core::CoreError::Hook { message, cause, .. } => (message, cause.map(|c| Box::new(c) as _)),
                            other => (other.to_string(), Some(Box::new(other))),
                        };
                        error = Some(TorchError::Hook { component: info.component.clone(), message, source });
                        return Err(());
                    }
                }
            }
            if let Some((_, positions)) = reshape.keep_positions.as_ref().filter(|(s, _)| *s == i) {
                match hook_ops::select::flatten_resolved(&current, 1, positions) {
                    Ok(t) => (current, changed) = (t, true),
                    Err(e) => {
                        let message = format!("keeping the logit positions {:?}: {e}", positions.flatten());
                        error = Some(TorchError::Hook { component: info.component.clone(), message, source: None });
                        return Err(());
                    }
                }
            }
            if stop_when_done && !std::mem::replace(&mut fired[site_id], true) {
                waiting -= 1;
                if waiting == 0 {
                    stopped = true;
                    return Err(()); // the op throws; the forward unwinds
                }
            }
            Ok(changed.then_some(current))
        };
        // Without hooks the dispatcher is not installed, so every site returns at once.
        let out = {
            let _armed = if any_hooks {
                let ptr: *mut Dispatch<'_> = &mut dispatch;
                // SAFETY: the guard takes the pointer out of ACTIVE when it drops, at the end of
                // this block, before `dispatch` goes out of scope.
                let ptr = unsafe { std::mem::transmute::<*mut Dispatch<'_>, *mut Dispatch<'static>>(ptr) };
                ArmedForward::arm(Some(ptr), &armed)
            } else {
                ArmedForward::arm(None, &[])
            };
            match past {
                None => module.forward(&ids, &mask).map(|logits| (logits, Vec::new())),
                Some(past) => module.step(&ids, &mask, past),
            }
        };
        if let Some((site, message)) = PANIC.with(|p| p.borrow_mut().take()) {
            let component = id_to_index.get(site).and_then(|&i| sites.get(i)).map(|s| s.component.clone()).unwrap_or_default();
            return Err(TorchError::HookPanic { component, message });
        }
        if let Some(e) = error {
            return Err(e);
        }
        if stopped {
            return Ok(None);
        }
        out.map(Some)
    }
}

