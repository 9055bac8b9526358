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
//! README there for why that is layout-safe). The NCCL part (src/shim/nccl.cpp) also needs
//! NCCL's header (nvidia-nccl-cu13, a torch dependency) and the CUDA runtime's, whose crt/ and
//! nv/ parts come only with nvidia-cuda-crt and nvidia-cuda-cccl (`make setup` installs them).
//! It is built, and `torch_cuda` linked, whenever those headers are found; the crate then gets
//! `--cfg medssl_nccl`. Without them it builds without NCCL, with a warning that says how to
//! get them (`ProcessGroup::nccl` then returns `Error::NcclNotBuilt`). Nothing of it needs a
//! GPU: libtorch_cuda.so loads, and NCCL code links, on a machine without one.

use std::env;
use std::path::{Path, PathBuf};

/// The shim's translation units, one job each; nccl.cpp is added when the CUDA headers are
/// found (see `cuda_includes`).
const SOURCES: [&str; 8] = [
    "src/shim/errors.cpp",
    "src/shim/store.cpp",
    "src/shim/gloo.cpp",
    "src/shim/collectives.cpp",
    "src/shim/autograd.cpp",
    "src/shim/autocast.cpp",
    "src/shim/determinism.cpp",
    "src/shim/gradients.cpp",
];

/// The CUDA 13.0 header wheels that match torch 2.13's `cuda-toolkit==13.0.3.0` pins.
const CUDA_HEADER_WHEELS: &str = "nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85";

fn main() {
    println!("cargo:rerun-if-changed=src/shim");
    println!("cargo:rerun-if-changed=include");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=MEDSSL_CUDA_INCLUDE");
    println!("cargo::rustc-check-cfg=cfg(medssl_nccl)");

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

    // nccl.cpp needs other include folders and defines, so it is compiled on its own, but its
    // object goes into the same archive as the rest: it calls errors.cpp's helpers, and one
    // archive leaves the linker no order of static libraries to get wrong.
    let nccl_built = match cuda_includes(&torch_root) {
        Ok(dirs) => {
            let mut nccl = base_build(&torch_includes);
            nccl.define("USE_C10D_NCCL", None);
            for dir in dirs {
                nccl.flag("-isystem").flag(dir.display().to_string());
            }
            // cuda_memory.cpp needs the same CUDA headers (and is gated with NCCL by one cfg).
            shim.objects(
                nccl.file("src/shim/nccl.cpp")
                    .file("src/shim/cuda_memory.cpp")
                    .compile_intermediates(),
            );
            println!("cargo:rustc-cfg=medssl_nccl");
            true
        }
        Err(why) => {
            println!("cargo:warning={why}");
            false
        }
    };
    shim.compile("medssl_torch_ext_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    // ProcessGroupNCCL lives in libtorch_cuda.so, which loads without a GPU (it is the same
    // library build-support/link_libtorch.rs links into every binary for tch's CUDA). Binaries
    // that never reach nccl.cpp's object drop it again (`--as-needed`).
    if nccl_built {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
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
/// `:`) first, then the wheels' folders in the venv's site-packages, next to torch. `Err` (the
/// build's warning) names the headers that none of them holds and how to get them.
///
/// Cargo reruns this script when a found header changes or goes, or, while some are missing,
/// when anything under the folders that exist changes (a `pip install` of the header wheels
/// into an existing venv then turns NCCL on at the next build, with no `cargo clean`).
fn cuda_includes(torch_root: &Path) -> Result<Vec<PathBuf>, String> {
    // A LIBTORCH install has no site-packages: these folders then just do not exist.
    let nvidia = torch_root.parent().unwrap_or(torch_root).join("nvidia");
    let mut dirs: Vec<PathBuf> = env::var_os("MEDSSL_CUDA_INCLUDE")
        .map(|paths| env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.push(nvidia.join("cu13/include"));
    dirs.push(nvidia.join("nccl/include"));
    let needed = ["nccl.h", "cuda_runtime_api.h", "crt/host_config.h", "nv/target"];
    let mut missing = Vec::new();
    for header in needed {
        match dirs.iter().map(|dir| dir.join(header)).find(|path| path.exists()) {
            Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
            None => missing.push(header),
        }
    }
    if missing.is_empty() {
        dirs.retain(|dir| dir.is_dir());
        return Ok(dirs);
    }
    for dir in dirs.iter().filter(|dir| dir.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let searched: Vec<String> = dirs.iter().map(|dir| dir.display().to_string()).collect();
    Err(format!(
        "building without NCCL process groups: CUDA headers {} not found in {}. To build them \
         (no GPU needed), install the header wheels into the venv next to torch \
         (`.venv/bin/pip install {CUDA_HEADER_WHEELS}`; `make setup` does this) or set \
         MEDSSL_CUDA_INCLUDE to `:`-separated folders that hold them",
        missing.join(", "),
        searched.join(", ")
    ))
}
