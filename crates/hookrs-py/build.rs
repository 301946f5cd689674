//! The extension module finds libtorch through the Python `torch` package: `import hookrs`
//! imports torch first, which loads libtorch (and, on a CUDA build, its CUDA backend) into the
//! process; the module's `libtorch_cpu.so` / `libc10.so` entries resolve to those. An rpath
//! relative to the module (`hookrs/_native*.so` next to `torch/` in site-packages) is the
//! fallback. No absolute rpath here (unlike the crates' own binaries, see hook-build): a wheel
//! must not name the build machine's paths.
fn main() {
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
}
