//! `cargo xtask build-cuda`: kv-validate with candle's CUDA backend, built on
//! a machine that has neither a CUDA install nor a GPU driver.
//!
//! - The toolkit (nvcc, cicc, headers, cudart, cuBLAS, cuRAND, NVRTC) comes
//!   from NVIDIA's PyPI wheels, pinned to CUDA 13.0: the GPU machines run
//!   driver 580 (CUDA 13.0), and PTX from a newer toolkit does not load there.
//!   They go to `.cache/cuda/` (`KV_CUDA_DIR` to choose), once.
//! - libcuda comes with the driver. cudarc links it at build time, so a link
//!   stub stands in for it, as CUDA's own `lib64/stubs` does: a shared
//!   library named `libcuda.so.1` exporting every driver API name cudarc
//!   declares. At run time the real driver's `libcuda.so.1` is loaded.
//! - The build goes to `target/cuda/` so the CPU build in `target/release`
//!   stays as it is; kernels are compiled for compute capability 9.0
//!   (H100/H200) unless `--compute-cap N` says otherwise.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, python, repo_root, run_checked, target_dir};

/// The wheels, pinned. The cuBLAS line takes the newest 13.0.x.
const WHEELS: [&str; 8] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas<13.1",
    "nvidia-curand==10.4.0.35",
];
/// Libraries the wheels ship under versioned sonames only; the linker wants the bare names.
const SONAME_LINKS: [&str; 5] = ["cublas", "cublasLt", "cudart", "curand", "nvrtc"];
/// H100 and H200.
const DEFAULT_COMPUTE_CAP: &str = "90";

pub fn run(args: &[String]) -> Result<()> {
    let compute_cap = match args {
        [] => DEFAULT_COMPUTE_CAP.to_string(),
        [flag, cap] if flag == "--compute-cap" && cap.parse::<u32>().is_ok() => cap.clone(),
        _ => bail!("usage: cargo xtask build-cuda [--compute-cap N] (N as 90 for sm_90)"),
    };
    let dir = cuda_dir();
    let toolkit = ensure_toolkit(&dir)?;
    let stub = ensure_driver_stub(&dir)?;
    let out = target_dir().join("cuda");
    eprintln!("xtask: building kv-validate with --features cuda for sm_{compute_cap} into {} (about 20 minutes cold on 2 cores)...", out.display());
    let path = std::env::join_paths(std::iter::once(toolkit.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let library_path = std::env::join_paths([stub.clone(), toolkit.join("lib")])?;
    run_checked(
        Command::new(cargo())
            .current_dir(repo_root())
            .args([
                "build",
                "--release",
                "-p",
                "kv-validate",
                "--features",
                "cuda",
            ])
            .env("CARGO_TARGET_DIR", &out)
            .env("PATH", path)
            .env("CUDA_ROOT", &toolkit)
            .env("CUDA_PATH", &toolkit)
            .env("CUDA_COMPUTE_CAP", &compute_cap)
            .env("LIBRARY_PATH", library_path),
    )?;
    let binary = out.join("release").join("kv-validate");
    println!("{}", binary.display());
    eprintln!(
        "xtask: built {}. It needs the NVIDIA driver and the CUDA 13 runtime libraries \
         (cuBLAS, cuRAND, cudart) where it runs: put their directory on LD_LIBRARY_PATH \
         (e.g. /usr/local/cuda-13.0/targets/x86_64-linux/lib, or {}). \
         kv-compress needs no GPU: use the CPU build (cargo build --release -p kv-compress).",
        binary.display(),
        toolkit.join("lib").display()
    );
    Ok(())
}

/// `$KV_CUDA_DIR`, else `.cache/cuda` in the repo (gitignored).
fn cuda_dir() -> PathBuf {
    std::env::var_os("KV_CUDA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache").join("cuda"))
}

/// Installs the pinned wheels into `dir` unless the same pins already are;
/// returns the toolkit root (`nvidia/cu13`).
fn ensure_toolkit(dir: &Path) -> Result<PathBuf> {
    let toolkit = dir.join("nvidia").join("cu13");
    let marker = dir.join("wheels.txt");
    let pins = WHEELS.join("\n") + "\n";
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(pins.as_str())
        && toolkit.join("bin").join("nvcc").is_file()
    {
        eprintln!("xtask: CUDA 13.0 toolkit present in {}", toolkit.display());
        return Ok(toolkit);
    }
    eprintln!(
        "xtask: pip install --target {} of the CUDA 13.0 wheels (about 1.2 GB)...",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    run_checked(
        Command::new(python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--upgrade",
                "--target",
            ])
            .arg(dir)
            .args(WHEELS),
    )?;
    for sub in ["bin", "nvvm/bin"] {
        make_executable(&toolkit.join(sub))?;
    }
    let lib = toolkit.join("lib");
    for name in SONAME_LINKS {
        let prefix = format!("lib{name}.so.");
        let versioned = std::fs::read_dir(&lib)
            .with_context(|| format!("reading {}", lib.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|file| file.starts_with(&prefix))
            .min()
            .with_context(|| format!("no {prefix}* in {}", lib.display()))?;
        let link = lib.join(format!("lib{name}.so"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    std::fs::write(&marker, pins).with_context(|| format!("writing {}", marker.display()))?;
    Ok(toolkit)
}

fn make_executable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
    }
    Ok(())
}

/// Builds `stub/libcuda.so` from the driver functions cudarc declares;
/// returns its directory.
fn ensure_driver_stub(dir: &Path) -> Result<PathBuf> {
    let declarations = cudarc_driver_sys()?;
    let source = std::fs::read_to_string(&declarations)
        .with_context(|| format!("reading {}", declarations.display()))?;
    let names = driver_function_names(&source);
    if names.is_empty() {
        bail!("no cu* functions found in {}", declarations.display());
    }
    let stub = dir.join("stub");
    std::fs::create_dir_all(&stub)?;
    let c_file = stub.join("stub.c");
    let c_source: String = names
        .iter()
        .map(|name| format!("void {name}(void) {{}}\n"))
        .collect();
    std::fs::write(&c_file, c_source)?;
    run_checked(
        Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
            .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(stub.join("libcuda.so"))
            .arg(&c_file),
    )?;
    eprintln!(
        "xtask: libcuda link stub with {} driver functions in {}",
        names.len(),
        stub.display()
    );
    Ok(stub)
}

/// The names of `fn cu...(` declarations in cudarc's driver bindings, each once.
fn driver_function_names(source: &str) -> BTreeSet<&str> {
    source
        .match_indices("fn cu")
        .filter_map(|(at, _)| {
            let name = &source[at + 3..];
            let end = name.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            (name[end..].starts_with('(')).then_some(&name[..end])
        })
        .collect()
}

/// cudarc's `src/driver/sys/mod.rs`, from the package cargo resolved for `--features cuda`.
fn cudarc_driver_sys() -> Result<PathBuf> {
    let output = Command::new(cargo())
        .current_dir(repo_root())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "kv-validate/cuda",
        ])
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "cudarc")
        .and_then(|package| package["manifest_path"].as_str())
        .context("cargo metadata lists no cudarc package: is candle's cuda feature wired?")?;
    Ok(Path::new(manifest)
        .with_file_name("src")
        .join("driver")
        .join("sys")
        .join("mod.rs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_are_the_declared_functions_once() {
        let source = "extern \"C\" {\n pub fn cuInit(flags: u32) -> CUresult;\n \
                      pub fn cuMemAlloc_v2(p: *mut u64, n: usize) -> CUresult;\n \
                      pub fn cuInit(flags: u32) -> CUresult;\n}\n\
                      // fn cuda_like_comment\nlet f = fn curious;\n";
        let names: Vec<_> = driver_function_names(source).into_iter().collect();
        assert_eq!(names, ["cuInit", "cuMemAlloc_v2"]);
    }
}
