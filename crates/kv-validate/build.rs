//! With the `cuda` feature, compiles `src/model/kernels.cu` to PTX with
//! nvcc (`NVCC`, else `nvcc` on PATH; `cargo xtask build-cuda` provides it)
//! for `CUDA_COMPUTE_CAP` (default 90: H100/H200). Without it, nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/model/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let nvcc = std::env::var_os("NVCC").unwrap_or_else(|| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(out.join("kernels.ptx"))
        .arg("src/model/kernels.cu")
        .status()
        .unwrap_or_else(|error| {
            panic!("cannot run {nvcc:?} (needed by the cuda feature): {error}")
        });
    assert!(
        status.success(),
        "nvcc failed on src/model/kernels.cu ({status})"
    );
}
