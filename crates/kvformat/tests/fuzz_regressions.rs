//! Every input the fuzzers kept (`testdata/fuzz-regressions/`), replayed
//! through the very harnesses the fuzz targets run (included from `fuzz/src`).

#[path = "../../../fuzz/src/checksums.rs"]
mod checksums;
#[path = "../../../fuzz/src/format_inputs.rs"]
mod format_inputs;
#[path = "../../../fuzz/src/regressions.rs"]
mod regressions;
#[path = "../../../fuzz/src/scratch.rs"]
mod scratch;

use regressions::{regressions_dir, replay};

#[test]
fn cache_reader_regressions() {
    replay(
        &regressions_dir(env!("CARGO_MANIFEST_DIR")),
        "cache_reader",
        |bytes| {
            format_inputs::read_cache(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}

#[test]
fn sidecar_parser_regressions() {
    replay(
        &regressions_dir(env!("CARGO_MANIFEST_DIR")),
        "sidecar_parser",
        |bytes| {
            format_inputs::read_sidecar(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}

/// The `-decompress` inputs, at the container level (the CLI level is
/// replayed by kv-compress's tests).
#[test]
fn packed_decoder_regressions() {
    replay(
        &regressions_dir(env!("CARGO_MANIFEST_DIR")),
        "packed_decoder",
        |bytes| {
            format_inputs::read_packed(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}
