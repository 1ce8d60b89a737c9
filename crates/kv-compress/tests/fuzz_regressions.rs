//! Every `-decompress` and command-line input the fuzzers kept
//! (`testdata/fuzz-regressions/`), replayed through the very harnesses the
//! fuzz targets run (included from `fuzz/src`).

#[path = "../../../fuzz/src/checksums.rs"]
mod checksums;
#[path = "../../../fuzz/src/cli_inputs.rs"]
mod cli_inputs;
#[path = "../../../fuzz/src/regressions.rs"]
mod regressions;
#[path = "../../../fuzz/src/scratch.rs"]
mod scratch;

use regressions::{regressions_dir, replay};

#[test]
fn packed_decoder_regressions() {
    replay(
        &regressions_dir(env!("CARGO_MANIFEST_DIR")),
        "packed_decoder",
        |bytes| {
            cli_inputs::decompress(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}

#[test]
fn flag_parser_regressions() {
    replay(
        &regressions_dir(env!("CARGO_MANIFEST_DIR")),
        "flag_parser",
        |bytes| {
            cli_inputs::parse_flags(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}
