//! Peak resident memory on files that claim far more than they hold: the
//! whole process, measured from outside the reader. Each case runs in a
//! fresh child process (this test binary re-executed on one probe test), which
//! reports its own `VmHWM` after reading; a fresh `execve` starts a fresh
//! high-water mark, and a child reading a tiny valid file is the baseline.
//!
//! Bound: peak RSS <= baseline + file size + 16 MiB (the file may be mapped
//! and read once; nothing proportional to the claimed size may be allocated).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

mod hostile_common;

use hostile_common::{edit_first_manifest_entry, million_empty_tensors};
use kvformat::codec::CodecParams;
use kvformat::packed::{pack_tensor, write_packed, PackedFile};
use kvformat::{write_cache, CacheDtype, CacheTensor, KvCache};

const PROBE_ENV: &str = "KVFORMAT_HOSTILE_PROBE";
const SLACK_BYTES: u64 = 16 << 20;

/// Run only inside a child: reads the file named by the environment as a KV
/// cache or packed file, then prints this process's peak RSS.
#[test]
fn probe() {
    let Ok(spec) = std::env::var(PROBE_ENV) else {
        return;
    };
    let (kind, path) = spec.split_once(':').expect("kind:path");
    let path = Path::new(path);
    let outcome = match kind {
        "cache" => KvCache::open(path).map(drop),
        "packed" => PackedFile::open(path).and_then(|packed| {
            let names: Vec<String> = packed.manifest().tensors.keys().cloned().collect();
            names
                .iter()
                .try_for_each(|name| packed.unpack(name).map(drop))
        }),
        other => panic!("unknown probe kind {other}"),
    };
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM line");
    println!(
        "PROBE ok={} vmhwm_kb={}",
        outcome.is_ok(),
        hwm_kb.trim().trim_end_matches(" kB")
    );
}

/// Peak RSS in bytes of a child reading `path` as `kind`, and whether it read it.
fn peak_rss(kind: &str, path: &Path) -> (u64, bool) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probe", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, format!("{kind}:{}", path.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, probe)| probe))
        .unwrap_or_else(|| {
            panic!(
                "no probe line: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let field = |key: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(key))
            .unwrap()
            .to_string()
    };
    (
        field("vmhwm_kb=").parse::<u64>().unwrap() * 1024,
        field("ok=") == "true",
    )
}

fn small_cache(path: &Path) {
    let values = [0.5f32; 64];
    let tensor = CacheTensor {
        name: "layer_0_key",
        dtype: CacheDtype::F16,
        shape: &[1, 1, 1, 64],
        values: &values,
    };
    write_cache(path, &[tensor], &BTreeMap::new()).unwrap();
}

fn assert_bounded(kind: &str, path: &Path, baseline: u64) {
    let (peak, ok) = peak_rss(kind, path);
    let file = std::fs::metadata(path).unwrap().len();
    assert!(!ok, "{} must be rejected", path.display());
    assert!(
        peak <= baseline + file + SLACK_BYTES,
        "{}: peak RSS {peak} > baseline {baseline} + file {file} + {SLACK_BYTES}",
        path.display()
    );
}

#[test]
fn files_claiming_terabytes_stay_within_the_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let valid = dir.path().join("valid.safetensors");
    small_cache(&valid);
    let (baseline, ok) = peak_rss("cache", &valid);
    assert!(ok, "the baseline file must read");

    // A packed tensor of 2^40 values whose LZ4 payload claims 8 TB.
    let bomb = dir.path().join("bomb.safetensors");
    let values: Vec<f32> = vec![0.0; 4096];
    let (tensor, _) = pack_tensor(
        "layer_0_key",
        CacheDtype::F16,
        &[1, 1, 64, 64],
        &values,
        &CodecParams::adr002(64),
    )
    .unwrap();
    assert!(tensor.entry.lz4);
    write_packed(&bomb, &[tensor], &BTreeMap::new()).unwrap();
    edit_first_manifest_entry(&bomb, |entry| {
        entry.insert("shape".into(), serde_json::json!([1u64 << 40]));
        entry.insert("raw_len".into(), (1u64 << 43).into());
    });
    assert_bounded("packed", &bomb, baseline);

    // A header length of a terabyte.
    let header = dir.path().join("header.safetensors");
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&header, bytes).unwrap();
    assert_bounded("cache", &header, baseline);

    // A million empty tensors in a 56 MB header.
    let many = dir.path().join("many.safetensors");
    std::fs::write(&many, million_empty_tensors()).unwrap();
    assert_bounded("cache", &many, baseline);
}
