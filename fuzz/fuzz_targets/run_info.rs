//! A `jobs/runs/get` answer, parsed and then judged as the reconciler does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use runbridge::databricks::RunInfo;
use runbridge::reconciler::classify;

fuzz_target!(|data: &[u8]| {
    if let Ok(run) = serde_json::from_slice::<RunInfo>(data) {
        let _ = classify(&run);
    }
});
