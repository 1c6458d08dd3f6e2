//! Linker settings for libtorch (see ../shared/reference/engine-notes.md).
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    // Find libtorch at run time without LD_LIBRARY_PATH: first beside the binary, in the layout the
    // image uses (bin/skytrain, torch/lib; scripts/collect-runtime.sh), then where the building
    // machine has it. LD_LIBRARY_PATH overrides both (RUNPATH).
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
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
