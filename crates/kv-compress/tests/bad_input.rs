//! Every bad input of issue 2: exit 1, one `Error:` line naming the file (and
//! tensor) and the problem, and no output file left behind.

mod common;

use std::path::Path;

use common::*;
use kvformat::CacheDtype;

/// Runs `args` expecting exit 1, a single stderr line containing every
/// `needle`, and nothing new in `dir` but the files that were there.
fn assert_fails(dir: &Path, args: &[&str], needles: &[&str]) {
    let before = files_in(dir);
    let output = kv_compress(args);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {text}");
    assert!(output.stdout.is_empty(), "{args:?}");
    assert!(
        text.starts_with("Error: ") && text.ends_with('\n') && text.lines().count() == 1,
        "{args:?}: {text:?}"
    );
    for needle in needles {
        assert!(text.contains(needle), "{args:?}: {text:?} lacks {needle:?}");
    }
    assert_eq!(files_in(dir), before, "{args:?} left a file behind");
}

/// Writes `bytes` as `name` in `dir` and checks compressing it fails with `needles`.
fn assert_bad_cache(name: &str, bytes: &[u8], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(name);
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out.safetensors");
    let mut all = vec![name];
    all.extend_from_slice(needles);
    assert_fails(
        dir.path(),
        &["-input", s(&input), "-output", s(&output)],
        &all,
    );
}

const F32_PAIR: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

#[test]
fn missing_and_unreadable_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let out = dir.path().join("out");
    assert_fails(
        dir.path(),
        &["-input", s(&missing), "-output", s(&out)],
        &["missing.safetensors", "No such file"],
    );
    // A directory cannot be read as a file, and says so (it was "No such device").
    let sub = dir.path().join("adir");
    std::fs::create_dir(&sub).unwrap();
    assert_fails(
        dir.path(),
        &["-input", s(&sub), "-output", s(&out)],
        &["adir: is a directory, not a regular file"],
    );
}

#[test]
fn empty_file() {
    assert_bad_cache("empty.safetensors", b"", &["empty file"]);
}

#[test]
fn truncated_header() {
    assert_bad_cache(
        "short.safetensors",
        &[5, 0, 0],
        &["shorter than the 8-byte header length"],
    );
    let full = raw_safetensors(F32_PAIR, &[0; 8]);
    assert_bad_cache(
        "cut.safetensors",
        &full[..20],
        &["header length runs past the end of the file"],
    );
}

#[test]
fn header_length_beyond_the_file() {
    let mut bytes = raw_safetensors(F32_PAIR, &[0; 8]);
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    assert_bad_cache(
        "long.safetensors",
        &bytes,
        &["header length runs past the end"],
    );
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_bad_cache("huge.safetensors", &bytes, &["header length"]);
}

#[test]
fn header_not_json() {
    assert_bad_cache(
        "text.safetensors",
        &raw_safetensors("this is not json", &[]),
        &["header is not valid safetensors JSON"],
    );
    assert_bad_cache(
        "binary.safetensors",
        &raw_safetensors("\u{0}\u{1}", &[]),
        &["header"],
    );
    let mut bytes = raw_safetensors("{}xx", &[]);
    bytes[9] = 0xFF;
    assert_bad_cache("utf8.safetensors", &bytes, &["header is not UTF-8"]);
}

#[test]
fn truncated_data() {
    let bytes = raw_safetensors(F32_PAIR, &[0; 8]);
    assert_bad_cache(
        "trunc.safetensors",
        &bytes[..bytes.len() - 3],
        &["tensor data does not end exactly at the end of the file"],
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_bad_cache("trailing.safetensors", &trailing, &["does not end exactly"]);
}

#[test]
fn overlapping_or_out_of_range_offsets() {
    let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    assert_bad_cache(
        "overlap.safetensors",
        &raw_safetensors(overlap, &[0; 12]),
        &["data offsets overlap"],
    );
    let out_of_range = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    assert_bad_cache(
        "range.safetensors",
        &raw_safetensors(out_of_range, &[0; 12]),
        &["does not end exactly"],
    );
    let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert_bad_cache(
        "gap.safetensors",
        &raw_safetensors(gap, &[0; 8]),
        &["\"a\": data offsets"],
    );
}

#[test]
fn shape_and_byte_length_disagree() {
    let header = r#"{"layer_0_key":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#;
    assert_bad_cache(
        "size.safetensors",
        &raw_safetensors(header, &[0; 8]),
        &["layer_0_key", "shape x dtype"],
    );
    let overflow =
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#;
    assert_bad_cache(
        "overflow.safetensors",
        &raw_safetensors(overflow, &[0; 8]),
        &["overflows"],
    );
}

#[test]
fn unsupported_dtype() {
    let header = r#"{"layer_3_value":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#;
    assert_bad_cache(
        "int.safetensors",
        &raw_safetensors(header, &[0; 8]),
        &["layer_3_value", "unsupported dtype I32"],
    );
}

#[test]
fn nan_or_infinity_in_a_tensor() {
    for (name, bad) in [
        ("nan.safetensors", f32::NAN),
        ("inf.safetensors", f32::NEG_INFINITY),
    ] {
        let header = r#"{"layer_1_key":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let data: Vec<u8> = [1.0f32, bad].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_bad_cache(
            name,
            &raw_safetensors(header, &data),
            &["layer_1_key", "non-finite value", "index 1"],
        );
    }
    // F16 infinity (0x7C00) too.
    let header = r#"{"layer_0_value":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
    assert_bad_cache(
        "inf16.safetensors",
        &raw_safetensors(header, &[0x00, 0x7C]),
        &["layer_0_value", "non-finite value inf"],
    );
}

#[test]
fn output_directory_missing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &[1, 1, 4, 64]);
    let output = dir.path().join("no_such_dir").join("out.safetensors");
    assert_fails(
        dir.path(),
        &["-input", s(&input), "-output", s(&output)],
        &["no_such_dir", "output directory does not exist"],
    );
}

#[test]
fn output_same_as_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &[1, 1, 4, 64]);
    let before = std::fs::read(&input).unwrap();
    let dotted = dir.path().join(".").join("kv.safetensors");
    for output in [&input, &dotted] {
        // A usage error (the two flags collide): exit 2, before any work.
        let result = kv_compress(&["-input", s(&input), "-output", s(output)]);
        let text = stderr(&result);
        assert_eq!(result.status.code(), Some(2), "{text}");
        assert!(
            text.starts_with("Error: ")
                && text.lines().count() == 1
                && text.contains("kv.safetensors (-output) is the same file as")
                && text.contains("(-input)"),
            "{text:?}"
        );
    }
    assert_eq!(files_in(dir.path()), vec![input.clone()]);
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn decompress_of_a_plain_cache() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("plain.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &[1, 1, 4, 64]);
    let output = dir.path().join("out.safetensors");
    assert_fails(
        dir.path(),
        &["-decompress", "-input", s(&input), "-output", s(&output)],
        &[
            "plain.safetensors",
            "not a kv-compress packed file (no kvformat.manifest)",
        ],
    );
}

/// Flips every byte of a small packed file, two ways, and decompresses each
/// through the library: every single one must fail, none may yield tensors.
#[test]
fn any_flipped_byte_fails_decompress() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    write_kv_cache(&input, CacheDtype::F16, 1, &[1, 2, 8, 64]);
    let packed = dir.path().join("kv.int4.safetensors");
    run_json(&["-input", s(&input), "-output", s(&packed)]);
    let good = std::fs::read(&packed).unwrap();
    let corrupt = dir.path().join("corrupt.safetensors");
    let options = kv_compress::Options {
        input: Some(corrupt.clone()),
        decompress: true,
        metrics_only: true,
        ..Default::default()
    };
    std::fs::write(&corrupt, &good).unwrap();
    kv_compress::run(&options).expect("the intact file decompresses");
    for position in 0..good.len() {
        for mask in [0x01u8, 0xFF] {
            let mut bytes = good.clone();
            bytes[position] ^= mask;
            std::fs::write(&corrupt, &bytes).unwrap();
            if let Ok(report) = kv_compress::run(&options) {
                panic!("flipping byte {position} with {mask:#04x} still decompressed: {report:?}");
            }
        }
    }
    // Through the binary: a flipped payload byte is a checksum error naming the tensor.
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&corrupt, &bytes).unwrap();
    let out = dir.path().join("restored.safetensors");
    assert_fails(
        dir.path(),
        &["-decompress", "-input", s(&corrupt), "-output", s(&out)],
        &["corrupt.safetensors", "layer_0_value", "checksum mismatch"],
    );
    // Truncated anywhere: fails too.
    for cut in [1, 100, good.len() / 2, good.len() - 1] {
        std::fs::write(&corrupt, &good[..cut]).unwrap();
        assert!(kv_compress::run(&options).is_err(), "truncated at {cut}");
    }
}
