//! Compiles the C++ shim (src/shim) against the libtorch that torch-sys found, and links it.
//!
//! torch-sys (`links = "tch"`) hands its direct dependents the libtorch lib folder as
//! `DEP_TCH_LIBTORCH_LIB`; the headers sit beside it (the PyPI wheel's layout). Flags follow
//! what the wheel was built with: the C++11 std::string ABI (PyPI's torch 2.13 is built with
//! it; torch-sys asks Python and passes the same), and C++20, which torch 2.13's
//! `cpp_extension` uses for extensions (its headers use C++20 features; torch-sys's `c++17`
//! only gets by on GCC extensions, with warnings).
//!
//! gloo's headers are not in the wheel: include/gloo holds declaration-only stand-ins (see the
//! README there for why that is layout-safe). The NCCL part (feature `nccl`) also needs NCCL's
//! header (nvidia-nccl-cu13, a torch dependency) and the CUDA runtime's, whose crt/ and nv/
//! parts come only with nvidia-cuda-crt and nvidia-cuda-cccl.

use std::env;
use std::path::{Path, PathBuf};

/// The shim's translation units, one job each; nccl.cpp is added by the `nccl` feature.
const SOURCES: [&str; 5] = [
    "src/shim/errors.cpp",
    "src/shim/store.cpp",
    "src/shim/gloo.cpp",
    "src/shim/collectives.cpp",
    "src/shim/autograd.cpp",
];

/// The CUDA 13.0 header wheels that match torch 2.13's `cuda-toolkit==13.0.3.0` pins.
const CUDA_HEADER_WHEELS: &str = "nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85";

fn main() {
    println!("cargo:rerun-if-changed=src/shim");
    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=MEDSSL_CUDA_INCLUDE");

    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("DEP_TCH_LIBTORCH_LIB is unset: torch-sys must be a direct dependency and find libtorch"),
    );
    let torch_root = lib.parent().expect("libtorch lib folder has a parent").to_path_buf();
    let torch_includes = [
        torch_root.join("include"),
        torch_root.join("include/torch/csrc/api/include"),
    ];

    let mut shim = base_build(&torch_includes);
    shim.define("USE_C10D_GLOO", None).include("include").files(SOURCES);
    shim.compile("medssl_torch_ext_shim");

    if env::var_os("CARGO_FEATURE_NCCL").is_some() {
        let mut nccl = base_build(&torch_includes);
        nccl.define("USE_C10D_NCCL", None);
        for dir in cuda_includes(&torch_root) {
            nccl.flag("-isystem").flag(dir.display().to_string());
        }
        nccl.file("src/shim/nccl.cpp").compile("medssl_torch_ext_nccl");
    }

    println!("cargo:rustc-link-search=native={}", lib.display());
    if env::var_os("CARGO_FEATURE_NCCL").is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // This crate's own tests run without LD_LIBRARY_PATH (binaries of other crates get their
    // rpath from build-support/link_libtorch.rs).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// A C++ build with libtorch's headers as system headers (their warnings are not ours).
fn base_build(torch_includes: &[PathBuf]) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .include("src/shim");
    for dir in torch_includes {
        build.flag("-isystem").flag(dir.display().to_string());
    }
    build
}

/// Header folders for the NCCL translation unit: `MEDSSL_CUDA_INCLUDE` (folders separated by
/// `:`) first, then the wheels' folders in the venv's site-packages, next to torch.
fn cuda_includes(torch_root: &Path) -> Vec<PathBuf> {
    let nvidia = torch_root.parent().expect("torch sits in site-packages").join("nvidia");
    let mut dirs: Vec<PathBuf> = env::var_os("MEDSSL_CUDA_INCLUDE")
        .map(|paths| env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.push(nvidia.join("cu13/include"));
    dirs.push(nvidia.join("nccl/include"));
    let needed = ["nccl.h", "cuda_runtime_api.h", "crt/host_config.h", "nv/target"];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|header| !dirs.iter().any(|dir| dir.join(header).exists()))
        .collect();
    if !missing.is_empty() {
        panic!(
            "feature `nccl`: headers {missing:?} not found in {dirs:?}. Install the CUDA header \
             wheels next to torch (`pip install {CUDA_HEADER_WHEELS}` in the venv) or set \
             MEDSSL_CUDA_INCLUDE to folders that hold them."
        );
    }
    dirs
}
