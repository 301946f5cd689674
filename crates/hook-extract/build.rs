//! Links libtorch into every binary of this crate (tests, examples, benches): an rpath (see the
//! hook-build crate; the CUDA backend is loaded at run time by `hook_torch::backend`).
fn main() {
    hook_build::link_libtorch();
}
