//! With `--features mkl`: record the pip-installed MKL's library directory
//! as an rpath, so the binary finds `libiomp5.so` (the OpenMP runtime MKL's
//! threaded layer links dynamically) without `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-env-changed=MKLROOT");
    if std::env::var_os("CARGO_FEATURE_MKL").is_some() {
        if let Some(root) = std::env::var_os("MKLROOT") {
            let lib = std::path::Path::new(&root).join("lib");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
    }
}
