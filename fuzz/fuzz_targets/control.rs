//! A control-queue message (operator cancels).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = runbridge::reconciler::parse_control(data);
});
