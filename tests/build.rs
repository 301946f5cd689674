//! Links libtorch into the test binaries (rpath, CUDA backend; see the hook-build crate).
fn main() {
    hook_build::link_libtorch();
}
