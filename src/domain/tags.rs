//! Tags: the labels a promise carries and a search filters on. One set of
//! limits for every way a promise is made (trigger, child, the Durable
//! Promise API, Resonate's protocol) and every filter (HTTP search, cancel
//! by tags, the control queue): a promise's tags are decoded and compared
//! inside Redis scripts, so their number and size bound what one record
//! costs there.

use std::collections::BTreeMap;

pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 1024;

/// Why a set of tags was refused; the message states the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("at most {MAX_TAGS} tags, got {0}")]
    TooMany(usize),
    #[error("tag {0:?}: keys are 1-{MAX_TAG_KEY} bytes, values at most {MAX_TAG_VALUE}")]
    Size(String),
}

/// Checks tags (or a tag filter) against the limits.
pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), TagError> {
    if tags.len() > MAX_TAGS {
        return Err(TagError::TooMany(tags.len()));
    }
    if let Some((k, _)) = tags
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_TAG_KEY || v.len() > MAX_TAG_VALUE)
    {
        let shown: String = k.chars().take(40).collect();
        return Err(TagError::Size(shown));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let many: BTreeMap<_, _> = (0..=MAX_TAGS)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert_eq!(check_tags(&many), Err(TagError::TooMany(MAX_TAGS + 1)));
        let empty_key = BTreeMap::from([(String::new(), "v".to_owned())]);
        assert!(check_tags(&empty_key).is_err());
        let long_key = BTreeMap::from([("k".repeat(MAX_TAG_KEY + 1), "v".to_owned())]);
        assert!(check_tags(&long_key).is_err());
        let long_value = BTreeMap::from([("k".to_owned(), "v".repeat(MAX_TAG_VALUE + 1))]);
        assert!(check_tags(&long_value).is_err());
        let ok = BTreeMap::from([("team".to_owned(), "growth".to_owned())]);
        assert_eq!(check_tags(&ok), Ok(()));
    }
}
