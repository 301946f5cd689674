//! Links libtorch (rpath, CUDA backend) into the extension module, as every crate linking tch.
fn main() {
    hook_build::link_libtorch();
}
