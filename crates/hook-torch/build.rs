//! Compiles the C++ shim (the `hookrs::point` op and the graph rewrite) against the libtorch
//! that torch-sys links (DEP_TCH_LIBTORCH_LIB, exported because torch-sys has `links = "tch"`),
//! and writes an rpath to it so tests, benches and binaries run with no LD_LIBRARY_PATH.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    let root = std::path::Path::new(&lib).parent().expect("lib/ has a parent").to_path_buf();
    cc::Build::new()
        .cpp(true)
        .file("src/shim/hookrs_shim.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("hookrs_shim");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rerun-if-changed=src/shim/hookrs_shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
