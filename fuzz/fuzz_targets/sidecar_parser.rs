#![no_main]
//! Fuzz target: see `kv_fuzz::format_inputs::read_sidecar`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kv_fuzz::format_inputs::read_sidecar(data);
});
