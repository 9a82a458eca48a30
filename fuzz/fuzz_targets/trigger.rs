//! A trigger message's body, as the worker receives it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use runbridge::domain::{Envelope, Trigger, TriggerRules};

fuzz_target!(|data: &[u8]| {
    let env = Envelope {
        body: data.to_vec(),
        message_id: None,
        reply_to: None,
        correlation_id: None,
        traceparent: None,
    };
    let _ = Trigger::parse(&env, &TriggerRules::default());
});
