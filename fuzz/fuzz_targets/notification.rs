//! A Databricks job notification (webhook destination) payload.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = runbridge::sidecar::parse_notification(data);
});
