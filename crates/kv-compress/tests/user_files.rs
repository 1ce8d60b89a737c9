//! Issue 21 ("Reliability III") on the real binary: a run never destroys a
//! file the user did not give it as an output (a file named like the
//! output's sidecar, an input reached through another name), empty path
//! flags are missing ones, and a full file-size limit or an unwritable
//! directory is an error that names the user's output and leaves no temp file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use kvformat::{sidecar_path, CacheDtype, Sidecar};

const SHAPE: [usize; 4] = [1, 2, 64, 64];

/// A two-layer F32 cache at `path`, with a sidecar when `with_sidecar`.
fn cache(path: &Path, with_sidecar: bool) {
    write_kv_cache(path, CacheDtype::F32, 2, &SHAPE);
    if with_sidecar {
        Sidecar {
            num_layers: 2,
            num_kv_heads: SHAPE[1],
            seq_len: SHAPE[2],
            head_dim: SHAPE[3],
            dtype: "float32".into(),
            model_name: "m".into(),
        }
        .write(&sidecar_path(path))
        .unwrap();
    }
}

fn temp_files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".kv-compress-")
        })
        .collect()
}

/// Asserts exit `code` and one `Error:` line holding every needle.
fn assert_error(output: &Output, code: i32, needles: &[&str]) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    assert!(output.stdout.is_empty());
    assert!(
        text.starts_with("Error: ") && text.lines().count() == 1,
        "{text:?}"
    );
    for needle in needles {
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }
    text
}

#[test]
fn a_file_named_like_the_output_sidecar_is_replaced_or_removed_only_when_it_is_that_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (bare_input, with_sidecar) = (
        dir.path().join("bare.safetensors"),
        dir.path().join("kv.safetensors"),
    );
    cache(&bare_input, false);
    cache(&with_sidecar, true);
    let output = dir.path().join("out.safetensors");
    let stale = sidecar_path(&output);
    // Not JSON, JSON that is no sidecar, and a sidecar of another cache: each
    // kept, the run refused, whether it would remove the file (an input
    // without a sidecar) or replace it (an input with one).
    let other_shape =
        "{\"num_layers\": 2, \"num_kv_heads\": 8, \"seq_len\": 64, \"head_dim\": 64, \
                       \"dtype\": \"float32\", \"model_name\": \"m\"}";
    run_json(&["-input", s(&with_sidecar), "-output", s(&output)]);
    let packed = std::fs::read(&output).unwrap();
    for (contents, reason) in [
        ("my notes, not JSON", "is not a kv-compress sidecar"),
        ("{\"experiment\": 7}", "is not a kv-compress sidecar"),
        (other_shape, "is a sidecar, but not of the file at"),
    ] {
        for input in [&bare_input, &with_sidecar] {
            std::fs::write(&stale, contents).unwrap();
            let result = kv_compress(&["-input", s(input), "-output", s(&output)]);
            assert_error(
                &result,
                1,
                &[
                    "out.metadata.json: refusing to replace or remove it",
                    reason,
                ],
            );
            assert_eq!(
                std::fs::read_to_string(&stale).unwrap(),
                contents,
                "{reason}"
            );
            assert!(
                std::fs::read(&output).unwrap() == packed,
                "the old output changed"
            );
            assert!(temp_files_in(dir.path()).is_empty());
        }
    }
    // A sidecar beside no output at all describes nothing this run replaces.
    let lonely = dir.path().join("lonely.safetensors");
    std::fs::copy(sidecar_path(&with_sidecar), sidecar_path(&lonely)).unwrap();
    let result = kv_compress(&["-input", s(&bare_input), "-output", s(&lonely)]);
    assert_error(
        &result,
        1,
        &["refusing to replace or remove it", "of no cache at"],
    );
    assert!(sidecar_path(&lonely).exists() && !lonely.exists());
    // The real stale sidecar of the old output goes, so the pair left is this run's.
    std::fs::copy(sidecar_path(&with_sidecar), &stale).unwrap();
    run_json(&["-input", s(&bare_input), "-output", s(&output)]);
    assert!(!stale.exists(), "the stale sidecar stayed");
    assert!(output.exists());
    // And the old output's sidecar is replaced by the new one's.
    run_json(&["-input", s(&with_sidecar), "-output", s(&output)]);
    run_json(&["-input", s(&with_sidecar), "-output", s(&output)]);
    assert_eq!(Sidecar::read(&stale).unwrap().num_layers, 2);
}

#[test]
fn an_output_that_is_an_input_by_another_name_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache(&input, true);
    let before = std::fs::read(&input).unwrap();
    let hard_link = dir.path().join("hard.safetensors");
    std::fs::hard_link(&input, &hard_link).unwrap();
    let symlink = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("kv.safetensors", &symlink).unwrap();
    let dotted = dir.path().join("sub/../kv.safetensors");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for output in [&hard_link, &symlink, &dotted] {
        let result = kv_compress(&["-input", s(&input), "-output", s(output)]);
        assert_error(&result, 2, &["(-output) is the same file as", "(-input)"]);
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
    // Nor the program itself, here by a hard link (a copy would be open for
    // writing while other tests fork: "Text file busy"; a rename over the
    // link, were the rule broken, would leave the built binary alone).
    let beside_target = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let program = beside_target.path().join("kv-compress");
    std::fs::hard_link(env!("CARGO_BIN_EXE_kv-compress"), &program).unwrap();
    let result = Command::new(&program)
        .args(["-input", s(&input), "-output", s(&program)])
        .output()
        .unwrap();
    assert_error(&result, 2, &["(the running kv-compress)"]);
}

#[test]
fn empty_path_flags_are_missing_flags() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache(&input, false);
    assert_error(
        &kv_compress(&["-input="]),
        1,
        &["Error: -input is required"],
    );
    assert_error(
        &kv_compress(&["-input", "", "-metrics-only"]),
        1,
        &["-input is required"],
    );
    let result = kv_compress(&["-input", s(&input), "-output="]);
    let text = assert_error(&result, 1, &[]);
    assert_eq!(
        text,
        "Error: -output is required (use -metrics-only for dry run)\n"
    );
    assert_eq!(files_in(dir.path()), vec![input]);
}

#[test]
fn a_file_size_limit_is_an_error_naming_the_output_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache(&input, true);
    let output = dir.path().join("out.safetensors");
    // 8 blocks (4 or 8 KiB, by the shell's unit) is below the ~17 KiB packed file.
    let result = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 8 && exec \"$0\" -input \"$1\" -output \"$2\"")
        .arg(env!("CARGO_BIN_EXE_kv-compress"))
        .arg(&input)
        .arg(&output)
        .output()
        .unwrap();
    let text = assert_error(&result, 1, &[s(&output), "File too large"]);
    assert!(!text.contains(".kv-compress-"), "{text}");
    assert!(temp_files_in(dir.path()).is_empty(), "a temp file was left");
    assert!(!output.exists() && !sidecar_path(&output).exists());
}

#[test]
fn an_unwritable_output_directory_is_named_by_the_output_never_the_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kv.safetensors");
    cache(&input, false);
    // /proc refuses new files even to root; a 0555 directory to anyone else.
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(
        &read_only,
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .unwrap();
    let mut outputs = vec![Path::new("/proc/out.safetensors").to_path_buf()];
    let probe = read_only.join("probe");
    if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).unwrap(); // root: permissions do not bind
    } else {
        outputs.push(read_only.join("out.safetensors"));
    }
    for output in outputs {
        let result = kv_compress(&["-input", s(&input), "-output", s(&output)]);
        let text = assert_error(
            &result,
            1,
            &[&format!("{}: cannot create it", output.display())],
        );
        assert!(!text.contains(".kv-compress-"), "{text}");
    }
}
