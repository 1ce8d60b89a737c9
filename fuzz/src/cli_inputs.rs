//! Harnesses over `kv-compress`: the `-decompress` pipeline on arbitrary
//! packed-file bytes, and the Go-style flag parser on arbitrary arguments.

use kv_compress::flags::{self, Command, Options, GROUP_SIZE_RANGE};
use kvformat::metrics::Report;
use kvformat::KvCache;

use crate::checksums::with_fixed_checksums;
use crate::scratch::ScratchDir;

/// Runs `kv-compress -decompress -input IN -output OUT` on `bytes` after
/// [`with_fixed_checksums`]. When it succeeds, its JSON report must hold only
/// finite numbers and the restored file must be a KV cache with the
/// manifest's names and shapes.
pub fn decompress(bytes: &[u8]) -> Result<Report, kv_compress::Error> {
    let scratch = ScratchDir::new();
    let input = scratch.file("input.safetensors", &with_fixed_checksums(bytes));
    let output = scratch.path("restored.safetensors");
    let options = Options {
        input: Some(input),
        output: Some(output.clone()),
        decompress: true,
        ..Options::default()
    };
    let report = kv_compress::run(&options)?;
    let json = report.to_json();
    let parsed: Report = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("report is not valid JSON ({e}): {json}"));
    assert_eq!(parsed.num_tensors, report.num_tensors, "{json}");
    let restored = KvCache::open(&output).expect("the restored file is a KV cache");
    assert_eq!(restored.tensors().count(), report.num_tensors);
    Ok(report)
}

/// Parses `bytes` as a command line (arguments separated by NUL, which no
/// real argument can contain). Whatever parses must respect the documented
/// ranges: out-of-range values are errors, never silently accepted.
pub fn parse_flags(bytes: &[u8]) -> Result<Command, flags::FlagError> {
    let text = String::from_utf8_lossy(bytes);
    let args: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\0').map(String::from).collect()
    };
    let command = flags::parse(&args)?;
    if let Command::Run(options) = &command {
        assert!(
            GROUP_SIZE_RANGE.contains(&options.group_size) && options.group_size.is_power_of_two(),
            "{options:?}"
        );
        assert!((0.0..1.0).contains(&options.sparsity), "{options:?}");
        assert!(
            kvformat::codec::SUPPORTED_BITS.contains(&options.bits),
            "{options:?}"
        );
        if let Some(rate) = options.rate {
            assert!(kvformat::codec::RATE_RANGE.contains(&rate), "{options:?}");
        }
    }
    Ok(command)
}
