// Embeds an rpath to libtorch's lib/ folder so `target/*/dreambooth` runs
// without LD_LIBRARY_PATH. torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
