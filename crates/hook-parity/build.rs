//! Links libtorch into the runners with an rpath (see the hook-build crate).
fn main() {
    hook_build::link_libtorch();
}
