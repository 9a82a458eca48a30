//! The core vocabulary: identifiers, the trigger message, the promise and its
//! completion event. Pure code: no I/O, no clients, so every rule here is
//! tested without a broker or a Redis.

pub mod event;
pub mod ids;
pub mod promise;
pub mod trigger;

pub use event::CompletionEvent;
pub use ids::{CallbackSigner, CallbackToken, IdempotencyToken, PromiseId, RunId};
pub use promise::{Completion, Payload, Promise, SettledBy, State};
pub use trigger::{Envelope, Launch, Parameters, Trigger, TriggerError, TriggerRules};
