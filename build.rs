// Embeds an rpath to libtorch's lib/ folder so `target/*/dreambooth` runs
// without LD_LIBRARY_PATH. torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB.
// libtorch_cuda is linked with --no-as-needed: nothing calls it by symbol (it
// registers CUDA with libtorch when loaded), so the linker would drop it and
// CUDA would look absent on a GPU machine.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
