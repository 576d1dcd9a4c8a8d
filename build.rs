//! Compiles the shim, `csrc/*.cpp` (what tch does not expose: autocast with a chosen dtype, the CUDA allocator's
//! statistics, c10d, CUDA graphs, and darts' own CPU kernels), against libtorch's headers, with the same flags as
//! tch's own wrapper; its files compile in parallel (cc's jobserver).
//!
//! Links so that libtorch_cuda stays a needed library (the same binary then uses CUDA where a GPU is present)
//! and so that libtorch's folder is found at run time without LD_LIBRARY_PATH (a RUNPATH entry, which
//! LD_LIBRARY_PATH still overrides, e.g. to run on another machine's torch/lib).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let mut sources: Vec<std::path::PathBuf> = std::fs::read_dir("csrc")
        .expect("the shim's folder csrc/")
        .map(|e| e.expect("an entry of csrc/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    sources.sort();
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(std::path::PathBuf::from);
    let include = lib.as_ref().and_then(|l| l.parent()).map(|p| p.join("include"));
    let Some(include) = include.filter(|i| i.join("ATen/autocast_mode.h").is_file()) else {
        panic!("libtorch's headers (include/ATen/autocast_mode.h next to its lib folder) were not found: run scripts/setup.sh, then . scripts/env.sh");
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .files(&sources)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // OpenMP: the shim's own kernels (the fused mixed sum) split their work with at::parallel_for, which
        // runs serially unless compiled with OpenMP; libtorch's libgomp (torch/lib) is linked below.
        .flag("-fopenmp")
        .flag("-O3")
        .warnings(false);
    // c10d (torch.distributed): the wheel ships its headers and symbols but not gloo's headers; Debian's
    // libgloo-dev has them (scripts/setup.sh installs it). Without them darts builds without multi-process runs.
    let gloo = std::env::var_os("DARTS_GLOO_INCLUDE").map(std::path::PathBuf::from).unwrap_or("/usr/include".into());
    println!("cargo:rerun-if-env-changed=DARTS_GLOO_INCLUDE");
    println!("cargo:rerun-if-changed={}", gloo.join("gloo/config.h").display());
    if gloo.join("gloo/config.h").is_file() {
        build.include(&gloo).define("USE_DISTRIBUTED", None).define("USE_C10D_GLOO", None).define("DARTS_DIST", None);
    } else {
        println!("cargo:warning=gloo's headers (libgloo-dev) not found: darts is built without multi-process runs");
    }
    // NCCL (ProcessGroupNCCL, in libtorch_cuda): nccl.h from the nvidia-nccl wheel torch depends on, CUDA's
    // runtime headers from its CUDA wheels (cu13 layout, or cu12's per-library folders).
    // The same CUDA headers give the shim CUDA graphs (ATen/cuda/CUDAGraph.h), with or without c10d.
    let nccl = nccl_includes(lib.as_deref());
    if let Some(dirs) = &nccl {
        for d in dirs {
            build.include(d);
        }
        build.define("USE_CUDA", None).define("DARTS_CUDA", None);
        if gloo.join("gloo/config.h").is_file() {
            build.define("USE_C10D_NCCL", None).define("DARTS_NCCL", None);
        }
    }
    precompile_header(&mut build, &include);
    build.compile("darts_shim");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return;
    }
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::path::PathBuf::from(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // The OpenMP runtime libtorch itself loads (one libgomp in the process), for the shim's parallel regions.
        let gomp = lib.join("libgomp.so.1");
        if gomp.is_file() {
            println!("cargo:rustc-link-arg={}", gomp.display());
        } else {
            println!("cargo:rustc-link-lib=gomp");
        }
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        if nccl.is_some() {
            // The shim's NCCL group and CUDA graphs call c10::cuda directly.
            println!("cargo:rustc-link-arg=-lc10_cuda");
        }
    }
}

/// The include folders the shim's NCCL backend needs (nccl.h, CUDA's headers), or None when this libtorch
/// has no CUDA (no libtorch_cuda) or the headers are not there; `DARTS_NCCL_INCLUDE` and `DARTS_CUDA_INCLUDE`
/// name them elsewhere.
fn nccl_includes(lib: Option<&std::path::Path>) -> Option<Vec<std::path::PathBuf>> {
    use std::path::PathBuf;
    println!("cargo:rerun-if-env-changed=DARTS_NCCL_INCLUDE");
    println!("cargo:rerun-if-env-changed=DARTS_CUDA_INCLUDE");
    let lib = lib?;
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = lib.parent()?.parent()?.join("nvidia");
    let pick = |var: &str, headers: &[&str], candidates: &[PathBuf]| -> Option<PathBuf> {
        let given = std::env::var_os(var).map(PathBuf::from);
        given.into_iter().chain(candidates.iter().cloned()).find(|d| headers.iter().all(|h| d.join(h).is_file()))
    };
    let nccl = pick("DARTS_NCCL_INCLUDE", &["nccl.h"], &[nvidia.join("nccl/include")]);
    // CUDA's runtime, compiler (crt/) and CCCL (nv/target) headers: scripts/setup.sh adds the last two to the wheel's.
    let cuda = pick(
        "DARTS_CUDA_INCLUDE",
        &["cuda_runtime_api.h", "crt/host_config.h", "nv/target"],
        &[nvidia.join("cu13/include"), "/usr/local/cuda/include".into()],
    );
    match (nccl, cuda) {
        (Some(n), Some(c)) => {
            println!("cargo:rerun-if-changed={}", n.join("nccl.h").display());
            Some(vec![n, c])
        }
        _ => {
            println!("cargo:warning=nccl.h or CUDA's headers not found: darts is built without NCCL (Gloo only)");
            None
        }
    }
}

/// Precompiles `csrc/shim.h` (libtorch's headers, which every file of the shim includes and which take most of
/// each file's compile time) with the build's own compiler and flags, and has every file force-include it; made
/// again when the header, the flags or libtorch's headers (its version, and the time its headers were written:
/// a reinstall) change, so an edit to a kernel's file reuses it. Where it cannot be made or used, GCC reads the
/// header itself: the same code, compiled slower.
fn precompile_header(build: &mut cc::Build, include: &std::path::Path) {
    let Some(out) = std::env::var_os("OUT_DIR").map(std::path::PathBuf::from) else { return };
    let compiler = build.get_compiler();
    if !compiler.is_like_gnu() || compiler.is_like_clang() {
        return;
    }
    let dir = out.join("pch");
    let (header, gch, stamp) = (dir.join("shim.h"), dir.join("shim.h.gch"), dir.join("stamp"));
    let Ok(text) = std::fs::read_to_string("csrc/shim.h") else { return };
    let mut command = compiler.to_command();
    command.args(["-x", "c++-header", "csrc/shim.h", "-o"]).arg(&gch);
    let args: Vec<_> = std::iter::once(command.get_program()).chain(command.get_args()).collect();
    let version = std::fs::read_to_string(include.join("torch/csrc/api/include/torch/version.h")).unwrap_or_default();
    let written = std::fs::metadata(include.join("ATen/ATen.h")).and_then(|m| m.modified()).ok();
    let key = format!("{args:?}\n{version}\n{written:?}\n{text}");
    let fresh = gch.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|k| k == key);
    let made = fresh || {
        let _ = std::fs::remove_file(&stamp);
        std::fs::create_dir_all(&dir).is_ok()
            && std::fs::write(&header, &text).is_ok()
            && command.status().is_ok_and(|s| s.success())
            && std::fs::write(&stamp, &key).is_ok()
    };
    if made {
        build.flag("-include").flag(header.display().to_string());
    } else {
        println!("cargo:warning=the shim's precompiled header could not be made: its files compile without it");
    }
}
