//! Helpers shared by the integration tests: deterministic caches, hand-built
//! safetensors bytes, and running the real binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use kvformat::{write_cache, CacheDtype, CacheTensor};

/// Deterministic pseudo-normal values (xorshift + Box-Muller), no dependency.
pub fn normal_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..count)
        .map(|_| {
            ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32
        })
        .collect()
}

/// A KV cache of `layers` x key/value tensors of `shape`, values ~ N(0, 1).
pub fn write_kv_cache(
    path: &Path,
    dtype: CacheDtype,
    layers: usize,
    shape: &[usize],
) -> Vec<(String, Vec<f32>)> {
    let count: usize = shape.iter().product();
    let tensors: Vec<(String, Vec<f32>)> = (0..layers)
        .flat_map(|i| ["key", "value"].map(|kind| format!("layer_{i}_{kind}")))
        .enumerate()
        .map(|(seed, name)| {
            let values = normal_values(count, seed as u64 + 1);
            // What the file will hold: values rounded to the dtype.
            let stored = dtype.to_f32(&dtype.from_f32(&values)).into_owned();
            (name, stored)
        })
        .collect();
    let views: Vec<CacheTensor<'_>> = tensors
        .iter()
        .map(|(name, values)| CacheTensor {
            name,
            dtype,
            shape,
            values,
        })
        .collect();
    let metadata = BTreeMap::from([("model_name".to_string(), "test-model".to_string())]);
    write_cache(path, &views, &metadata).unwrap();
    tensors
}

/// A safetensors file built byte by byte: u64 header length, header, data.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

pub fn kv_compress(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kv-compress"))
        .args(args)
        .output()
        .expect("kv-compress runs")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the binary expecting success and parses its single JSON object.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let output = kv_compress(args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {}",
        stderr(&output)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.ends_with("}\n"),
        "stdout must be one JSON object: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}
