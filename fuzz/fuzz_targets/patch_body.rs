//! A Durable Promise `PATCH /promises/{id}` body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = runbridge::sidecar::parse_patch("application/json", data);
});
