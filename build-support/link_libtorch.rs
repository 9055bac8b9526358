//! Shared build script of every crate that links libtorch (core, plugins, the runner).
//!
//! torch-sys tells its direct dependents where libtorch lives through `DEP_TCH_LIBTORCH_LIB`.
//! We bake that folder into the binary's rpath so `medssl` and every test executable run
//! without LD_LIBRARY_PATH. On a CUDA build of libtorch we also force `libtorch_cuda` to be
//! linked: without `--no-as-needed` the linker drops it (nothing references it by symbol)
//! and `tch::Cuda::is_available()` is false even on a GPU (tch-rs issues 177 and 907).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
