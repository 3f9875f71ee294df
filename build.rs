// 1. Embeds an rpath to libtorch's lib/ folder so `target/*/dreambooth` runs
//    without LD_LIBRARY_PATH. torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB.
// 2. libtorch_cuda is linked with --no-as-needed: nothing calls it by symbol (it
//    registers CUDA with libtorch when loaded), so the linker would drop it and
//    CUDA would look absent on a GPU machine.
// 3. Compiles src/shim/torch_shim.cpp: the libtorch calls tch does not bind,
//    src/shim/train_shim.cpp: autocast on the CPU, src/shim/foreach_shim.cpp:
//    multi-tensor optimizer kernels for CUDA,
//    src/shim/checkpoint_shim.cpp: the autograd function behind gradient checkpointing,
//    src/shim/fused_shim.cpp: the gradient-ready hook of `training.fused_backward`,
//    src/shim/cuda_shim.cpp: CUDA allocator statistics (only where libtorch has
//    CUDA and the CUDA runtime headers that the PyPI wheel's nvidia packages ship),
//    and src/shim/dist_shim.cpp: c10d's process groups for data-parallel training,
//    with Gloo where Gloo's headers are found (Debian's libgloo-dev; the wheel
//    ships Gloo's code inside libtorch_cpu but not its headers; or the folder
//    DREAMBOOTH_GLOO_INCLUDE names), with NCCL where its wheel's and CUDA's
//    headers are; else its form without a back end (`--nproc` then says so).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/shim/torch_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/checkpoint_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/cuda_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/train_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/foreach_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/fused_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/dist_shim.cpp");
    println!("cargo:rerun-if-env-changed=DREAMBOOTH_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=/usr/include/gloo/algorithm.h");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-check-cfg=cfg(libtorch_cuda)");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
        // device.rs asks libtorch for its CUDA version only where it can answer.
        println!("cargo:rustc-cfg=libtorch_cuda");
    }
    let include = lib.parent().expect("libtorch lib/ has a parent").join("include");
    // The same C++ ABI as the libtorch we link (PyPI wheels say so through Python).
    let abi = Command::new(std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into()))
        .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| s == "0" || s == "1")
        .unwrap_or_else(|| "1".into());
    let base = |build: &mut cc::Build| {
        build
            .cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-w")
            .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str());
    };
    let mut shim = cc::Build::new();
    base(&mut shim);
    shim.file("src/shim/torch_shim.cpp").file("src/shim/checkpoint_shim.cpp").file("src/shim/train_shim.cpp").file("src/shim/foreach_shim.cpp").file("src/shim/fused_shim.cpp").compile("dreambooth_torch_shim");
    // The CUDA statistics shim with CUDA where it compiles, else its no-CUDA form.
    let mut cuda = cc::Build::new();
    base(&mut cuda);
    cuda.file("src/shim/cuda_shim.cpp");
    let with_cuda = cuda_headers(&lib).is_some_and(|dir| {
        let mut attempt = cuda.clone();
        attempt.define("DBT_HAVE_CUDA", None).include(dir);
        attempt.try_compile("dreambooth_cuda_shim").map_err(|e| println!("cargo:warning=CUDA statistics left out: {e}")).is_ok()
    });
    if !with_cuda {
        cuda.compile("dreambooth_cuda_shim");
    }
    compile_dist_shim(&lib, &base);
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// A folder with the CUDA runtime headers (`cuda_runtime_api.h` and its `crt/`)
/// among the packages beside torch, when libtorch itself has CUDA: the nvidia
/// wheels' include folders, or the copy triton ships.
fn cuda_headers(torch_lib: &std::path::Path) -> Option<PathBuf> {
    if !torch_lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site_packages = torch_lib.parent()?.parent()?;
    let nvidia = site_packages.join("nvidia");
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .chain([nvidia.join("cuda_runtime/include"), site_packages.join("triton/backends/nvidia/include")])
        .filter(|p| p.join("cuda_runtime_api.h").exists() && p.join("crt/host_config.h").exists())
        .collect();
    candidates.sort();
    candidates.pop()
}

/// Compiles src/shim/dist_shim.cpp with every c10d back end whose headers are
/// here (Gloo and NCCL, then Gloo alone), else in its form without one.
fn compile_dist_shim(torch_lib: &std::path::Path, base: &dyn Fn(&mut cc::Build)) {
    println!("cargo:rustc-check-cfg=cfg(dist_gloo)");
    let mut dist = cc::Build::new();
    base(&mut dist);
    dist.file("src/shim/dist_shim.cpp");
    let gloo = gloo_headers();
    let nccl = nccl_headers(torch_lib);
    let with_gloo = |build: &mut cc::Build| {
        build.define("DBT_HAVE_GLOO", None);
        if let Some(dir) = gloo.as_ref().filter(|d| d.as_path() != std::path::Path::new("/usr/include")) {
            build.include(dir);
        }
    };
    let mut attempts: Vec<(&str, cc::Build)> = Vec::new();
    if let (Some(_), Some(dirs)) = (&gloo, &nccl) {
        let mut both = dist.clone();
        with_gloo(&mut both);
        both.define("DBT_HAVE_NCCL", None).includes(dirs);
        attempts.push(("Gloo and NCCL", both));
    }
    if gloo.is_some() {
        let mut only_gloo = dist.clone();
        with_gloo(&mut only_gloo);
        attempts.push(("Gloo", only_gloo));
    }
    for (what, attempt) in attempts {
        match attempt.try_compile("dreambooth_dist_shim") {
            Ok(()) => {
                println!("cargo:rustc-cfg=dist_gloo");
                return;
            }
            Err(e) => println!("cargo:warning=data-parallel training with {what} left out: {e}"),
        }
    }
    if gloo.is_none() {
        println!("cargo:warning=data-parallel training (--nproc) left out: no Gloo headers (apt-get install libgloo-dev, or set DREAMBOOTH_GLOO_INCLUDE)");
    }
    dist.compile("dreambooth_dist_shim");
}

/// The folder holding `gloo/algorithm.h`: DREAMBOOTH_GLOO_INCLUDE, else the system's.
fn gloo_headers() -> Option<PathBuf> {
    std::env::var_os("DREAMBOOTH_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/include"), PathBuf::from("/usr/local/include")])
        .find(|dir| dir.join("gloo/algorithm.h").exists())
}

/// NCCL's include folder (the nvidia-nccl wheel beside torch) with the CUDA
/// runtime's and the other nvidia wheels' (ATen's CUDA headers include cuBLAS,
/// cuSPARSE, cuSOLVER), when libtorch has CUDA.
fn nccl_headers(torch_lib: &std::path::Path) -> Option<Vec<PathBuf>> {
    let cuda = cuda_headers(torch_lib)?;
    let site_packages = torch_lib.parent()?.parent()?;
    let nvidia = site_packages.join("nvidia");
    if !nvidia.join("nccl/include/nccl.h").exists() {
        return None;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.push(cuda);
    // ATen's CUDA headers reach CCCL's <nv/target>, which torch's CUDA wheels do
    // not ship: the set-up adds the nvidia-cuda-cccl wheel (nvidia/cu13/include),
    // else a CUDA toolkit's headers serve.
    let toolkit = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .chain([PathBuf::from("/usr/local/cuda/include")])
        .flat_map(|d| [d.join("cccl"), d])
        .chain(dirs.iter().map(|d| d.join("cccl")))
        .find(|d| d.join("nv/target").exists())?;
    dirs.push(toolkit);
    Some(dirs)
}
