//! What a program sets for its whole process, once, at its start: the memory guard over
//! libtorch's CPU allocator ([`crate::memory`]) and whether libtorch's GPU backend is loaded
//! before anything asks about CUDA ([`crate::backend`]). A library call never does either
//! behind its caller's back; binaries call [`init`] first thing in `main` (the `hookrs` binary
//! does, with [`RuntimeOptions::from_env`]); Python opts in with `hookrs.set_memory_limit`.

/// The memory guard's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// No guard: libtorch's own allocator, untouched.
    Off,
    /// At most this many bytes held by live CPU tensors.
    Bytes(u64),
}

/// Whether libtorch's GPU backend is loaded at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuBackend {
    /// When the machine has a GPU driver ([`crate::backend::gpu_driver_present`]).
    #[default]
    Auto,
    /// Always (an error loading it is reported by `hookrs devices` and device errors).
    On,
    /// Not at start (it still loads when a CUDA device is asked for).
    Off,
}

/// The process-wide settings [`init`] applies.
///
/// ```
/// use hook_torch::runtime::{GpuBackend, MemoryLimit, RuntimeOptions};
/// let o = RuntimeOptions::from_vars(|k| (k == "HOOKRS_MEMORY_LIMIT").then(|| "2GiB".to_string()));
/// assert_eq!(o.memory_limit, MemoryLimit::Bytes(2 << 30));
/// assert_eq!(o.gpu_backend, GpuBackend::Auto);
/// assert!(o.why.contains("HOOKRS_MEMORY_LIMIT=2GiB"));
/// let off = RuntimeOptions::from_vars(|k| (k == "HOOKRS_MEMORY_LIMIT").then(|| "off".to_string()));
/// assert_eq!(off.memory_limit, MemoryLimit::Off);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// The memory guard's limit.
    pub memory_limit: MemoryLimit,
    /// Whether the GPU backend is loaded at start.
    pub gpu_backend: GpuBackend,
    /// Where the limit came from, repeated in the guard's refusals.
    pub why: String,
}

impl RuntimeOptions {
    /// The settings from the environment: `HOOKRS_MEMORY_LIMIT` (`16GiB`, `500MB`, bytes, or
    /// `off`; by default 90 % of the machine's memory) and `HOOKRS_GPU_BACKEND` (`on`, `off`,
    /// `auto`).
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`RuntimeOptions::from_env`] with `var` looking the variables up.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let (memory_limit, why) = match var("HOOKRS_MEMORY_LIMIT") {
            Some(v) if v.eq_ignore_ascii_case("off") || v.trim() == "0" => (MemoryLimit::Off, String::new()),
            Some(v) => match crate::memory::parse_size(&v) {
                Some(b) => (MemoryLimit::Bytes(b), format!("HOOKRS_MEMORY_LIMIT={v}")),
                None => machine(&format!("HOOKRS_MEMORY_LIMIT={v:?} is not a size such as 16GiB, so ")),
            },
            None => machine(""),
        };
        let gpu_backend = match var("HOOKRS_GPU_BACKEND").as_deref() {
            Some("on") | Some("1") => GpuBackend::On,
            Some("off") | Some("0") => GpuBackend::Off,
            _ => GpuBackend::Auto,
        };
        RuntimeOptions { memory_limit, gpu_backend, why }
    }
}

fn machine(prefix: &str) -> (MemoryLimit, String) {
    match crate::memory::machine_limit() {
        Some(b) => (MemoryLimit::Bytes(b), format!("{prefix}90% of this machine's memory; HOOKRS_MEMORY_LIMIT changes it")),
        None => (MemoryLimit::Off, String::new()),
    }
}

/// Applies `options` to this process: loads the GPU backend (before any CUDA query: libtorch
/// caches the first answer) and installs the memory guard. Call it once, first thing in
/// `main`; calling it again changes the limit.
///
/// ```no_run
/// fn main() {
///     hook_torch::runtime::init(&hook_torch::runtime::RuntimeOptions::from_env());
///     // ... load models, run
/// }
/// ```
pub fn init(options: &RuntimeOptions) {
    let load = match options.gpu_backend {
        GpuBackend::On => true,
        GpuBackend::Off => false,
        GpuBackend::Auto => crate::backend::gpu_driver_present(),
    };
    if load {
        let _ = crate::backend::load_gpu_backend(); // a failure is reported by `hookrs devices` and device errors
    }
    if let MemoryLimit::Bytes(b) = options.memory_limit {
        crate::memory::set_limit_because(Some(b), &options.why);
    }
}
