//! Linker settings for libtorch (see ../shared/reference/engine-notes.md).
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    // Find libtorch at run time without LD_LIBRARY_PATH on the machine that built the binary.
    if let Ok(libtorch) = env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    // CUDA link trap: with the default `--as-needed`, libtorch_cuda is dropped because nothing
    // references it directly, and tch::Cuda::is_available() then says false on a GPU machine.
    // `--allow-shlib-undefined` lets the binary link where the CUDA libraries libtorch_cuda needs are
    // absent (this build machine); on the GPU machine they are found at run time.
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
    }
}
