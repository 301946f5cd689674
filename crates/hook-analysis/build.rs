//! Links libtorch into every binary of this crate (tests, examples, benches): rpath, and the
//! CUDA backend with `--no-as-needed` (see the hook-build crate).
fn main() {
    hook_build::link_libtorch();
}
