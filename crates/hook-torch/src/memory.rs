//! The memory guard: the bytes held by live CPU tensors cannot pass a limit, so a model or an
//! input that asks for more memory than the machine has (a corrupted constant, a batch of a
//! million tokens) is a clean error naming the sizes, not a visit from the kernel's OOM killer.
//!
//! [`HookedModule::load`](crate::HookedModule::load) installs it over libtorch's CPU allocator
//! with the [`default_limit`]: 90 % of the machine's memory, or `HOOKRS_MEMORY_LIMIT`
//! (`16GiB`, `500MB`, a number of bytes, or `off`).

use crate::ffi;

/// Sets the limit on the bytes all live CPU tensors may hold together (`None`: no limit) and
/// installs the guard if it is not yet. Returns the bytes they hold now (tensors made before
/// the guard are not counted).
///
/// ```
/// let held = hook_torch::memory::set_limit(Some(1 << 40));
/// assert!(held >= 0);
/// let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
/// assert!(hook_torch::memory::cpu_tensor_bytes() >= held + (4 << 20));
/// drop(t);
/// hook_torch::memory::set_limit(hook_torch::memory::default_limit());
/// ```
pub fn set_limit(bytes: Option<u64>) -> i64 {
    CONFIGURED.store(true, std::sync::atomic::Ordering::SeqCst);
    let limit = bytes.map(|b| b.min(i64::MAX as u64) as i64).unwrap_or(0);
    // SAFETY: no pointers; the shim catches every C++ exception.
    unsafe { ffi::hookrs_memory_guard(limit) }
}

/// Bytes held by live CPU tensors allocated since the guard was installed (0 before).
pub fn cpu_tensor_bytes() -> i64 {
    // SAFETY: no pointers; the shim catches every C++ exception.
    unsafe { ffi::hookrs_memory_held() }
}

/// Whether a limit was set (by [`set_limit`] or at the first load).
static CONFIGURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The limit the guard starts with: `HOOKRS_MEMORY_LIMIT` if set (`off` for none), else 90 %
/// of the machine's memory (`/proc/meminfo`; none where that cannot be read).
pub fn default_limit() -> Option<u64> {
    match std::env::var("HOOKRS_MEMORY_LIMIT") {
        Ok(v) if v.eq_ignore_ascii_case("off") || v == "0" => None,
        Ok(v) => parse_size(&v).or_else(machine_limit),
        Err(_) => machine_limit(),
    }
}

fn machine_limit() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024 / 10 * 9)
}

/// `16GiB`, `500MB`, `1e9` or a number of bytes.
///
/// ```
/// assert_eq!(hook_torch::memory::parse_size("2GiB"), Some(2 << 30));
/// assert_eq!(hook_torch::memory::parse_size("500MB"), Some(500_000_000));
/// assert_eq!(hook_torch::memory::parse_size("12"), Some(12));
/// assert_eq!(hook_torch::memory::parse_size("lots"), None);
/// ```
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = (s[..split].trim().parse::<f64>().ok()?, s[split..].trim().to_ascii_lowercase());
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        "tib" => 1099511627776.0,
        _ => return None,
    };
    (num.is_finite() && num >= 0.0).then(|| (num * scale) as u64)
}

/// Installs the guard with the default limit, unless a limit was set already.
pub(crate) fn install() {
    if !CONFIGURED.load(std::sync::atomic::Ordering::SeqCst) {
        set_limit(default_limit());
    }
}
