//! The memory guard: the bytes held by live CPU tensors cannot pass a limit, so a model or an
//! input that asks for more memory than the machine has (a corrupted constant, a batch of a
//! million tokens) is a clean error naming the sizes, not a visit from the kernel's OOM killer.
//!
//! It replaces libtorch's CPU allocator for the whole process (every CPU allocation then takes
//! a mutex and a map insert), so nothing installs it behind the caller's back: a program opts
//! in at its start with [`crate::runtime::init`] (the `hookrs` binary does, with the
//! [`default_limit`]: 90 % of the machine's memory, or `HOOKRS_MEMORY_LIMIT`: `16GiB`,
//! `500MB`, a number of bytes, or `off`), or with [`set_limit`]. Python:
//! `hookrs.set_memory_limit(...)`.

use crate::ffi;

/// Installs the guard (once, for the whole process) and sets the limit on the bytes all live
/// CPU tensors may hold together (`None`: count, but no limit). Returns the bytes they hold
/// now (tensors made before the guard are not counted).
///
/// ```
/// let held = hook_torch::memory::set_limit(Some(1 << 40));
/// assert!(held >= 0);
/// let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
/// assert!(hook_torch::memory::cpu_tensor_bytes() >= held + (4 << 20));
/// drop(t);
/// ```
pub fn set_limit(bytes: Option<u64>) -> i64 {
    set_limit_because(bytes, "set by hook_torch::memory::set_limit")
}

/// [`set_limit`], saying where the limit came from (the refusal's message repeats it).
pub fn set_limit_because(bytes: Option<u64>, why: &str) -> i64 {
    let limit = bytes.map(|b| b.min(i64::MAX as u64) as i64).unwrap_or(0);
    let why = std::ffi::CString::new(why.replace('\0', " ")).unwrap_or_default();
    // SAFETY: `why` is a NUL-terminated string the shim copies before returning; the shim
    // catches every C++ exception.
    unsafe { ffi::hookrs_memory_guard(limit, why.as_ptr()) }
}

/// Bytes held by live CPU tensors allocated since the guard was installed (0 before).
pub fn cpu_tensor_bytes() -> i64 {
    // SAFETY: no pointers; the shim catches every C++ exception.
    unsafe { ffi::hookrs_memory_held() }
}

/// The limit a program starts with: `HOOKRS_MEMORY_LIMIT` if set (`off` for none), else 90 %
/// of the machine's memory (`/proc/meminfo`; none where that cannot be read).
pub fn default_limit() -> Option<u64> {
    match std::env::var("HOOKRS_MEMORY_LIMIT") {
        Ok(v) if v.eq_ignore_ascii_case("off") || v == "0" => None,
        Ok(v) => parse_size(&v).or_else(machine_limit),
        Err(_) => machine_limit(),
    }
}

/// 90 % of the machine's memory (`/proc/meminfo`), if it can be read.
pub fn machine_limit() -> Option<u64> {
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
