// 1. Embeds an rpath to libtorch's lib/ folder so `target/*/dreambooth` runs
//    without LD_LIBRARY_PATH. torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB.
// 2. libtorch_cuda is linked with --no-as-needed: nothing calls it by symbol (it
//    registers CUDA with libtorch when loaded), so the linker would drop it and
//    CUDA would look absent on a GPU machine.
// 3. Compiles src/shim/torch_shim.cpp (and train_shim.cpp, autocast): the libtorch
//    calls tch does not bind.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/shim/torch_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/train_shim.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
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
    cc::Build::new()
        .cpp(true)
        .file("src/shim/torch_shim.cpp")
        .file("src/shim/train_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .compile("dreambooth_torch_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
