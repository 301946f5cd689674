//! Compiles the C++ shim (`src/shim/`: one file per job, the C ABI in `hookrs_shim.h`) against the libtorch that torch-sys links (DEP_TCH_LIBTORCH_LIB, exported because torch-sys
//! has `links = "tch"`), and links libtorch into every binary of this crate with an rpath
//! (see the hook-build crate; the CUDA backend is loaded at run time by `backend`).
fn main() {
    let lib = hook_build::libtorch_lib().expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    let root = lib.parent().expect("lib/ has a parent").to_path_buf();
    const FILES: [&str; 7] = ["point", "rewrite", "devices", "dtypes", "memory_guard", "dlpack", "host_copy"];
    let mut build = cc::Build::new();
    for f in FILES {
        build.file(format!("src/shim/{f}.cpp"));
    }
    build
        .cpp(true)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("hookrs_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    hook_build::link_libtorch();
    println!("cargo:rerun-if-changed=src/shim");
}
