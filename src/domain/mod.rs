//! The core vocabulary: identifiers, the trigger message, the promise and its
//! completion event. Pure code: no I/O, no clients, so every rule here is
//! tested without a broker or a Redis.

pub mod event;
pub mod fanout;
pub mod id_pattern;
pub mod ids;
pub mod launch;
pub mod progress;
pub mod promise;
pub mod retry;
pub mod tags;
pub mod trace;
pub mod trigger;

pub use event::CompletionEvent;
pub use fanout::FanOut;
pub use id_pattern::IdPattern;
pub use ids::{CallbackSigner, CallbackToken, IdempotencyToken, Incarnation, PromiseId, RunId};
pub use promise::{Completion, Join, Payload, Promise, SettledBy, State};
pub use retry::{RetryMode, RetryPolicy};
pub use trigger::{Envelope, Launch, Parameters, Trigger, TriggerError, TriggerRules, Work};

/// Cases per hostile-input property test: `PROPTEST_CASES`, else 2,000
/// (`make fuzz` runs more).
#[cfg(test)]
pub(crate) fn hostile_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}
