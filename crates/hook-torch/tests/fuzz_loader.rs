//! The TorchScript loader and instrumenter against archives users might be handed: seeded
//! mutations of a real export (inside its zip entries, with the checksums fixed so the
//! mutations reach libtorch's pickle and TorchScript parsers and our graph rewrite), and valid
//! archives with unusual graphs (control flow, no `forward`, a newer format version, not a
//! model at all). Every case loads and runs, or is a clean error; never a panic or an abort.
//!
//! A fixed number of mutations by default; `HOOKRS_FUZZ_SECS=N` runs for N seconds instead
//! (`cargo xtask fuzz loader --secs N`).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use hook_core::rng::SplitMix64 as Rng;
use hook_torch::HookedModule;
use tch::Device;

/// CRC-32 (IEEE), as zip entries carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// One stored zip entry: its name, where its data is, and where its two CRC fields are.
struct Entry {
    name: String,
    data: std::ops::Range<usize>,
    crc_at: [usize; 2],
}

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}

fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}

/// The stored (uncompressed) entries of a zip archive, as TorchScript writes them.
fn entries(b: &[u8]) -> Vec<Entry> {
    let eocd = (0..b.len() - 21).rev().find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06]).expect("a zip archive");
    let (count, mut at) = (u16_at(b, eocd + 10), u32_at(b, eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(b[at..at + 4], [0x50, 0x4b, 0x01, 0x02]);
        let (method, size) = (u16_at(b, at + 10), u32_at(b, at + 20));
        let (n, e, c, local) = (u16_at(b, at + 28), u16_at(b, at + 30), u16_at(b, at + 32), u32_at(b, at + 42));
        let name = String::from_utf8_lossy(&b[at + 46..at + 46 + n]).into_owned();
        let start = local + 30 + u16_at(b, local + 26) + u16_at(b, local + 28);
        if method == 0 {
            out.push(Entry { name, data: start..start + size, crc_at: [local + 14, at + 16] });
        }
        at += 46 + n + e + c;
    }
    out
}

/// Mutates the data of one entry in place (sizes and offsets stay valid) and fixes its CRCs.
fn mutate(archive: &[u8], list: &[Entry], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = archive.to_vec();
    // the parsers' inputs more often than tensor storages
    let interesting: Vec<&Entry> = list.iter().filter(|e| !e.name.contains("/data/") || rng.below(8) == 0).collect();
    let e = interesting[rng.below(interesting.len())];
    if e.data.is_empty() {
        return (b, e.name.clone());
    }
    let data = &mut b[e.data.clone()];
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(data.len());
        match rng.below(6) {
            0 => data[i] ^= 1 << rng.below(8),
            1 => data[i] = rng.next_u64() as u8,
            // text-aware: digits, brackets and quotes steer the parsers into their edge cases
            2 => {
                const PUNCT: &[u8] = b"0123456789()[]{}:,.'\"\n -_xX";
                data[i] = PUNCT[rng.below(PUNCT.len())];
            }
            3 => {
                let j = rng.below(data.len());
                data[i] = data[j];
            }
            4 => {
                let n = rng.below(16).min(data.len() - i);
                data[i..i + n].fill(b' ');
            }
            _ => {
                // a large number where a small one was: lengths, shapes, offsets
                if data[i].is_ascii_digit() {
                    data[i] = b'9';
                } else {
                    data[i] = 0xff;
                }
            }
        }
    }
    let crc = crc32(&b[e.data.clone()]).to_le_bytes();
    for at in e.crc_at {
        b[at..at + 4].copy_from_slice(&crc);
    }
    (b, e.name.clone())
}

/// 2 GiB for the CPU tensors of this test process (far above what the tiny models need), so
/// that a mutation asking for too much is refused quickly, whatever the machine's memory.
fn small_memory_limit() {
    hook_torch::memory::set_limit(Some(2 << 30));
}

fn budget() -> Option<u64> {
    std::env::var("HOOKRS_FUZZ_SECS").ok().and_then(|s| s.parse().ok())
}

/// Loads and, when that works, runs: either may fail, cleanly.
fn try_archive(path: &Path) -> Result<(), String> {
    let mut m = HookedModule::load(path, Device::Cpu).map_err(|e| e.to_string())?;
    let (ids, mask) = common::inputs();
    m.forward(&ids, &mask).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn mutated_archives_load_and_run_or_fail_cleanly() {
    small_memory_limit();
    let archive = std::fs::read(common::model("llama")).unwrap();
    let list = entries(&archive);
    assert!(list.iter().any(|e| e.name.ends_with("data.pkl")) && list.iter().any(|e| e.name.contains("/code/")), "{:?}", list.iter().map(|e| &e.name).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutated.pt");
    let started = Instant::now();
    let mut rng = Rng::new(0x70AD);
    let (mut n, mut loaded, mut errors) = (0u64, 0u64, 0u64);
    while match budget() {
        Some(s) => started.elapsed() < Duration::from_secs(s),
        None => n < 60,
    } {
        let (bytes, entry) = mutate(&archive, &list, &mut rng);
        std::fs::write(&path, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(|| try_archive(&path))) {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(msg)) => {
                assert!(!msg.trim().is_empty(), "mutation {n} of {entry}: an empty error message");
                errors += 1;
            }
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("hookrs-loader-crash-{n}.pt"));
                std::fs::write(&keep, &bytes).unwrap();
                panic!("mutation {n} of {entry} panicked (kept as {})", keep.display());
            }
        }
        n += 1;
    }
    eprintln!("fuzz loader: {n} mutated archives: {loaded} loaded and ran, {errors} clean errors, 0 panics or aborts");
}

/// Found by the fuzzer: an int64 constant turned into 1.66e9 made the forward allocate until
/// the OOM killer stopped the process. The memory guard turns that into an error.
#[test]
fn constants_claiming_huge_sizes_are_a_clean_error_not_the_oom_killer() {
    small_memory_limit();
    let archive = std::fs::read(common::model("llama")).unwrap();
    let list = entries(&archive);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.pt");
    let (mut tried, mut refused) = (0, 0);
    for e in list.iter().filter(|e| e.name.contains("/constants/") && e.data.len() == 8) {
        let mut b = archive.clone();
        b[e.data.start + 3] = 0x63; // 0x63000000 more, as the fuzzer found
        let crc = crc32(&b[e.data.clone()]).to_le_bytes();
        for at in e.crc_at {
            b[at..at + 4].copy_from_slice(&crc);
        }
        std::fs::write(&path, &b).unwrap();
        tried += 1;
        if let Err(msg) = try_archive(&path) {
            assert!(!msg.trim().is_empty());
            refused += usize::from(msg.contains("out of memory guard"));
        }
    }
    assert!(tried > 0, "the llama export has int64 constants");
    assert!(refused > 0, "no constant made the forward ask for too much: the regression is not exercised");
    // the guard released what it counted: the module still loads and runs
    assert!(try_archive(&common::model("llama")).is_ok());
}

/// Valid archives with unusual contents, written by torch.
#[test]
fn unusual_archives_load_and_run_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, zipfile, torch
out, llama = sys.argv[1], sys.argv[2]

class Loops(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 50)
    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        for i in range(3):
            if bool(x.sum() > 0):
                x = x * 0.5
            else:
                x = x + attention_mask.unsqueeze(-1).to(x.dtype)
        return (self.lin(x),)
torch.jit.script(Loops()).save(out + "/loops.pt")

class NoForward(torch.nn.Module):
    @torch.jit.export
    def other(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1
torch.jit.script(NoForward()).save(out + "/no_forward.pt")

class OneInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2
torch.jit.script(OneInput()).save(out + "/one_input.pt")

# the llama export, claiming a newer archive format
with zipfile.ZipFile(llama) as src, zipfile.ZipFile(out + "/newer.pt", "w", zipfile.ZIP_STORED) as dst:
    for item in src.infolist():
        data = src.read(item.filename)
        if item.filename.endswith("/version") or item.filename.endswith("/.data/version"):
            data = b"99\n"
        dst.writestr(item, data)

torch.save({"w": torch.ones(2)}, out + "/state_dict.pt")   # an eager checkpoint, not TorchScript
open(out + "/empty.pt", "wb").close()
open(out + "/text.pt", "w").write("not a model")
"#;
    // torch.jit.script reads the classes' source: a file, not `python -c`
    let file = dir.path().join("unusual.py");
    std::fs::write(&file, script).unwrap();
    let st = std::process::Command::new(common::python()).arg(&file).arg(dir.path()).arg(common::model("llama")).status().unwrap();
    assert!(st.success());
    let cases = ["loops", "no_forward", "one_input", "newer", "state_dict", "empty", "text"];
    for case in cases {
        let path = dir.path().join(format!("{case}.pt"));
        let r = catch_unwind(AssertUnwindSafe(|| try_archive(&path))).unwrap_or_else(|_| panic!("{case}: panicked"));
        match (case, r) {
            // control flow loads; the shared inputs hold ids past its 50-token vocabulary
            ("loops", Err(e)) => assert!(e.contains("index out of range"), "loops: {e}"),
            ("newer", Err(e)) => assert!(e.contains("version") || e.contains("newer"), "newer: {e}"),
            (_, Err(e)) => assert!(!e.trim().is_empty(), "{case}: an empty error"),
            (case, Ok(())) => panic!("{case}: loaded and ran, which it cannot"),
        }
    }
    // a C++ exception inside the forward: a clean error, and the module stays usable with
    // the same results
    let mut m = HookedModule::load(dir.path().join("loops.pt"), Device::Cpu).unwrap();
    let good = tch::Tensor::from_slice(&[1i64, 5, 9, 49]).view([1, 4]);
    let bad = tch::Tensor::from_slice(&[1i64, 500, 9, 49]).view([1, 4]);
    let first = m.forward(&good, &good.ones_like()).unwrap();
    for _ in 0..3 {
        let e = m.forward(&bad, &bad.ones_like()).unwrap_err().to_string();
        assert!(e.contains("index out of range") && e.contains("TorchScript code"), "{e}");
        assert!(m.forward(&good, &good.ones_like()).unwrap().equal(&first));
    }
    // a directory and a missing file
    assert!(HookedModule::load(dir.path(), Device::Cpu).is_err());
    assert!(HookedModule::load(dir.path().join("missing.pt"), Device::Cpu).unwrap_err().to_string().contains("missing.pt"));
}
