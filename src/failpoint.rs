//! Crash points for fault tests, compiled in only with the `failpoints`
//! feature (the test build); in a release build `failpoint!` expands to nothing.
//!
//! `RUNBRIDGE_FAILPOINTS="name=action,name2=action"` arms them, where action is
//! `pause` (block this task forever, so a test can SIGKILL the process at that
//! exact point), `pause#N` (the same, at the point's Nth pass only: the
//! earlier ones go on), `abort` (die at once, no cleanup), `abort@P` (die with
//! probability P each time the point is passed: the chaos harness) or `off`. When a point is
//! hit, its name is appended to the file named by `RUNBRIDGE_FAILPOINT_MARKER`,
//! if set, so the test knows the process got there.

#[cfg(feature = "failpoints")]
use std::collections::HashMap;
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            $crate::failpoint::hit($name).await;
        }
    };
}

#[cfg(feature = "failpoints")]
fn armed() -> &'static HashMap<String, String> {
    static ARMED: OnceLock<HashMap<String, String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("RUNBRIDGE_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    })
}

#[cfg(feature = "failpoints")]
pub async fn hit(name: &str) {
    let Some(action) = armed().get(name) else {
        return;
    };
    if let Some(p) = action.strip_prefix("abort@") {
        // Probabilistic points are passed often: only a hit is marked.
        if p.parse::<f64>().is_ok_and(|p| rand::random::<f64>() < p) {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        return;
    }
    if let Some(n) = action.strip_prefix("pause#") {
        static PASSES: std::sync::Mutex<Option<HashMap<String, u64>>> = std::sync::Mutex::new(None);
        let pass = {
            let mut g = PASSES.lock().unwrap_or_else(|p| p.into_inner());
            let c = g
                .get_or_insert_with(HashMap::new)
                .entry(name.to_owned())
                .or_default();
            *c += 1;
            *c
        };
        if n.parse::<u64>().ok() != Some(pass) {
            return;
        }
    }
    if let Ok(path) = std::env::var("RUNBRIDGE_FAILPOINT_MARKER") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{name}");
        }
    }
    match action.as_str() {
        a if a == "pause" || a.starts_with("pause#") => std::future::pending::<()>().await,
        "abort" => std::process::abort(),
        _ => {}
    }
}
