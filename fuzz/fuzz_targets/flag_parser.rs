#![no_main]
//! Fuzz target: see `kv_fuzz::cli_inputs::parse_flags`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kv_fuzz::cli_inputs::parse_flags(data);
});
