//! W3C trace context as it crosses runbridge: a trigger's `traceparent`
//! header goes on to Databricks as an HTTP header, so it is checked where
//! it arrives. A malformed one (CR/LF, spaces, the wrong shape) is dropped
//! there (the caller warns and counts), never carried to a request it
//! would break.

/// The longest `traceparent` kept. Version 00 is 55 characters; later
/// versions may append fields, but nothing of this size is a trace context.
const MAX_LEN: usize = 512;

fn hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Is this a W3C `traceparent` (`<version>-<trace id>-<parent id>-<flags>`,
/// lowercase hex, neither id all zeros; version `ff` is invalid, version
/// `00` has exactly four fields, a later version may have more)?
pub fn is_traceparent(s: &str) -> bool {
    if s.len() > MAX_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [version, trace, parent, flags, rest @ ..] = parts.as_slice() else {
        return false;
    };
    hex(version, 2)
        && *version != "ff"
        && (*version != "00" || rest.is_empty())
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

/// A `traceparent` as it arrived: `Ok` with it if well formed (or absent),
/// `Err` with its length if it is to be dropped (only the length is worth
/// logging: the value is the sender's and may hold anything, line breaks
/// included).
pub fn checked_traceparent(tp: Option<String>) -> Result<Option<String>, usize> {
    match tp {
        Some(tp) if !is_traceparent(&tp) => Err(tp.len()),
        tp => Ok(tp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_and_malformed() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_traceparent(good));
        assert!(is_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Injected: 1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
        assert!(!is_traceparent(&format!("{good}-{}", "a".repeat(600))));
        assert_eq!(
            checked_traceparent(Some(good.into())),
            Ok(Some(good.into()))
        );
        assert_eq!(checked_traceparent(Some("x\ny".into())), Err(3));
        assert_eq!(checked_traceparent(None), Ok(None));
    }
}
