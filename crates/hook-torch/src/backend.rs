//! Which libtorch device backends this process has, and which libraries a binary links.
//!
//! libtorch registers its CUDA backend when `libtorch_cuda.so` is loaded. A binary whose
//! linker dropped that library (`--as-needed`, since no symbol of it is referenced) never
//! sees a GPU. The hook-build crate links it with `--no-as-needed`; these functions let tests
//! and the `hookrs devices` command check that without a GPU.

use std::path::Path;

/// Whether `libtorch_cuda.so` is mapped into this process (read from `/proc/self/maps`; false
/// where that file does not exist).
///
/// ```
/// // true with a CUDA build of libtorch, false with a CPU-only one: never a panic
/// let _ = hook_torch::backend::cuda_backend_loaded();
/// ```
pub fn cuda_backend_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().any(|l| l.contains("libtorch_cuda"))).unwrap_or(false)
}

/// Number of CUDA devices libtorch sees (0 without a GPU or without the backend).
pub fn cuda_device_count() -> i64 {
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

/// `cpu`, `cuda` or `cuda:N` as a device. Whether the device is there is checked by
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
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(tch::Device::Cuda(n)),
            None => Err(crate::TorchError::Input(format!("{s:?}: expected cpu, cuda or cuda:N"))),
        },
    }
}
