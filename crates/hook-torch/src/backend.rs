//! Which libtorch device backends this process has, and loading them when the machine has a GPU.
//!
//! libtorch registers its CUDA backend when `libtorch_cuda.so` is loaded, and caches the
//! answer the first time anything asks about CUDA. Loading that library costs about 260 MB
//! of resident memory and a fraction of a second at start (the CUDA runtime, cuBLAS, cuDNN …
//! come with it), which a CPU-only machine pays for nothing. So binaries do not link it; this
//! module loads it (`dlopen`, next to the `libtorch_cpu.so` the process runs; Linux only) when
//! a program asks at its start ([`crate::runtime::init`]: the `hookrs` binary does, when the
//! machine has a GPU driver, [`gpu_driver_present`], or `HOOKRS_GPU_BACKEND=on`), and on
//! demand when a CUDA device is asked for ([`parse_device`],
//! [`HookedModule::load`](crate::HookedModule::load), [`cuda_device_count`]). Nothing loads it
//! behind a library caller's back. In Python, `import torch` has loaded it already.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// libtorch's device backend libraries, in the order they are tried.
pub const BACKEND_LIBRARIES: &[&str] = &["libtorch_cuda.so", "libtorch_hip.so"];

/// Whether this machine has a GPU driver libtorch could use: the NVIDIA device files or
/// driver entry, WSL's GPU device, or ROCm's. Without one no CUDA or ROCm device can ever be
/// found, so the backend is not loaded at start.
///
/// ```
/// let _ = hook_torch::backend::gpu_driver_present(); // a few stat calls, never a panic
/// ```
pub fn gpu_driver_present() -> bool {
    ["/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd"].iter().any(|p| Path::new(p).exists())
}

/// The folder of the `libtorch_cpu.so` this process runs (read from `/proc/self/maps`).
fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("/libtorch_cpu.so"))?;
    let path = &line[line.find('/')?..];
    Path::new(path).parent().map(Path::to_path_buf)
}

/// What [`load_gpu_backend`] did the first time (later calls return the same).
static LOADED: Mutex<Option<Result<Option<PathBuf>, String>>> = Mutex::new(None);

/// Loads libtorch's GPU backend (`libtorch_cuda.so`, or `libtorch_hip.so`) into this process,
/// from the folder of its `libtorch_cpu.so`, once. `Ok(Some(path))`: loaded (now or before,
/// by this function or by the dynamic loader); `Ok(None)`: this libtorch has no GPU backend
/// (a CPU-only build); `Err`: the library is there but does not load (the loader's message).
///
/// Call it before anything asks libtorch about CUDA (`tch::Cuda::*`, `tch::manual_seed`):
/// libtorch remembers the first answer. hookrs calls it wherever a CUDA device is named.
///
/// ```
/// match hook_torch::backend::load_gpu_backend() {
///     Ok(Some(lib)) => println!("GPU backend: {}", lib.display()),
///     Ok(None) => println!("a CPU-only libtorch"),
///     Err(e) => println!("the GPU backend does not load: {e}"),
/// }
/// ```
pub fn load_gpu_backend() -> Result<Option<PathBuf>, String> {
    let mut done = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = done.as_ref() {
        return r.clone();
    }
    let r = load_now();
    *done = Some(r.clone());
    r
}

#[cfg(not(target_os = "linux"))]
fn load_now() -> Result<Option<PathBuf>, String> {
    Ok(None) // the backend is linked, or absent: hookrs loads it by hand only on Linux
}

#[cfg(target_os = "linux")]
fn load_now() -> Result<Option<PathBuf>, String> {
    if let Some(mapped) = mapped_backend() {
        return Ok(Some(mapped));
    }
    let Some(dir) = libtorch_dir() else { return Ok(None) };
    for name in BACKEND_LIBRARIES {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: dlopen of a path we checked exists; the handle is kept for the life of the
        // process (libtorch's registrations point into the library). dlerror is read at once.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null, read before any other dl call.
            let msg = unsafe {
                let e = libc::dlerror();
                if e.is_null() { "unknown error".to_string() } else { std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned() }
            };
            return Err(format!("{} does not load: {msg}", path.display()));
        }
        return Ok(Some(path));
    }
    Ok(None)
}

/// The GPU backend library already mapped into this process, if any.
fn mapped_backend() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let path = &l[l.find('/')?..];
        BACKEND_LIBRARIES.iter().any(|b| path.ends_with(&format!("/{b}"))).then(|| PathBuf::from(path))
    })
}

/// The CUDA runtime version libtorch's CUDA hooks report (`13000` for CUDA 13.0), or `None`
/// when libtorch answers CUDA queries with its stub: no backend, or the backend loaded only
/// after the first CUDA query. Needs no GPU.
///
/// ```
/// let _ = hook_torch::backend::cuda_runtime_version();
/// ```
pub fn cuda_runtime_version() -> Option<i64> {
    // SAFETY: no arguments; the shim catches every C++ exception.
    let v = unsafe { crate::ffi::hookrs_cuda_runtime_version() };
    (v >= 0).then_some(v as i64)
}

/// Whether `libtorch_cuda.so` is mapped into this process (read from `/proc/self/maps`; false
/// where that file does not exist).
///
/// ```
/// // true once the GPU backend is loaded (at start on a machine with a GPU driver): never a panic
/// let _ = hook_torch::backend::cuda_backend_loaded();
/// ```
pub fn cuda_backend_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().any(|l| l.contains("libtorch_cuda"))).unwrap_or(false)
}

/// Number of CUDA devices libtorch sees (0 without a GPU or without the backend). Loads the
/// GPU backend first ([`load_gpu_backend`]).
pub fn cuda_device_count() -> i64 {
    let _ = load_gpu_backend();
    tch::Cuda::device_count()
}

/// The `DT_NEEDED` entries (shared libraries the dynamic loader loads) of an ELF64
/// little-endian file, in order. `None` when the file is not such an ELF file or is malformed.
///
/// ```
/// let exe = std::env::current_exe().unwrap();
/// let needed = hook_torch::backend::needed_libraries(&exe).unwrap();
/// assert!(needed.iter().any(|l| l.starts_with("libc.so")));
/// assert_eq!(hook_torch::backend::needed_libraries(std::path::Path::new("Cargo.toml")), None);
/// ```
pub fn needed_libraries(path: &Path) -> Option<Vec<String>> {
    parse_needed(&std::fs::read(path).ok()?)
}

fn parse_needed(b: &[u8]) -> Option<Vec<String>> {
    // little-endian integer of `n` bytes at offset `o`; None past the end (never overflows)
    let int_at = |o: usize, n: usize| -> Option<u64> {
        let bytes = b.get(o..o.checked_add(n)?)?;
        Some(bytes.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    };
    let u16_at = |o: usize| int_at(o, 2);
    let u32_at = |o: usize| int_at(o, 4);
    let u64_at = |o: usize| int_at(o, 8);
    // ELF magic, 64-bit, little-endian
    if b.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::try_from(u16_at(0x3A)?).ok()?;
    let shnum = usize::try_from(u16_at(0x3C)?).ok()?;
    let section = |i: usize| -> Option<(u64, usize, usize, usize)> {
        let o = shoff.checked_add(i.checked_mul(shentsize)?)?;
        // (type, offset, size, link)
        let at = |k: usize| o.checked_add(k);
        Some((u32_at(at(4)?)?, usize::try_from(u64_at(at(24)?)?).ok()?, usize::try_from(u64_at(at(32)?)?).ok()?, usize::try_from(u32_at(at(40)?)?).ok()?))
    };
    const SHT_DYNAMIC: u64 = 6;
    const DT_NEEDED: u64 = 1;
    let mut out = Vec::new();
    for i in 0..shnum {
        let (kind, off, size, link) = section(i)?;
        if kind != SHT_DYNAMIC {
            continue;
        }
        let (_, stroff, strsize, _) = section(link)?;
        let strtab = b.get(stroff..stroff.checked_add(strsize)?)?;
        for k in 0..size / 16 {
            let e = off.checked_add(16 * k)?;
            let (tag, val) = (u64_at(e)?, usize::try_from(u64_at(e.checked_add(8)?)?).ok()?);
            if tag == 0 {
                break; // DT_NULL
            }
            if tag == DT_NEEDED {
                let s = strtab.get(val..)?;
                let end = s.iter().position(|&c| c == 0)?;
                out.push(String::from_utf8_lossy(&s[..end]).into_owned());
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_files_are_none_not_panics() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(parse_needed(&exe).is_some());
        for cut in [0, 5, 64, 0x40, 1000, exe.len() / 2] {
            let _ = parse_needed(&exe[..cut.min(exe.len())]); // never panics
        }
        let mut bad = exe[..4096.min(exe.len())].to_vec();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse_needed(&bad), None);
    }
}

/// `cpu`, `cuda` or `cuda:N` as a device; a CUDA device loads the GPU backend
/// ([`load_gpu_backend`]). Whether the device is there is checked by
/// [`HookedModule::load`](crate::HookedModule::load), whose error says why not.
///
/// ```
/// use tch::Device;
/// assert_eq!(hook_torch::backend::parse_device("cuda:1").unwrap(), Device::Cuda(1));
/// assert!(hook_torch::backend::parse_device("gpu").unwrap_err().to_string().contains("expected cpu, cuda or cuda:N"));
/// ```
pub fn parse_device(s: &str) -> crate::Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            let _ = load_gpu_backend();
            Ok(tch::Device::Cuda(0))
        }
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => {
                let _ = load_gpu_backend();
                Ok(tch::Device::Cuda(n))
            }
            None => Err(crate::TorchError::Input(format!("{s:?}: expected cpu, cuda or cuda:N"))),
        },
    }
}
