//! A Databricks error answer: any status, any body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use runbridge::databricks::ApiErrorBody;

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let e = ApiErrorBody::from_answer(status, body);
    // A body that is not the documented JSON is cut to 500 characters.
    if serde_json::from_slice::<ApiErrorBody>(body).is_err() {
        assert!(e.message.chars().count() <= 500);
    }
});
