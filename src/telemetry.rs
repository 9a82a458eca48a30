//! Logging: human-readable by default, JSON with `log.format = "json"`
//! (`RUNBRIDGE__LOG__FORMAT=json`). `RUST_LOG` overrides the level filter.

use tracing_subscriber::EnvFilter;

pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // lapin logs every returned message with its whole body at WARN; the relay
    // handles returns itself (and event bodies may hold data that must not
    // reach logs), so only lapin's errors get through from that target.
    let filter = match "lapin::returned_messages=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
