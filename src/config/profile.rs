//! A profile of the Databricks CLI's config file (`~/.databrickscfg`),
//! read as the Databricks SDKs do for the default workspace.

use super::ConfigError;

/// The keys runbridge uses (`host`, `token`, `client_id`, `client_secret`)
/// of one profile of a Databricks config file (INI, as the Databricks CLI
/// and SDKs write it). A named profile that is missing is an error.
pub(super) fn databricks_profile(
    file: &std::path::Path,
    profile: &str,
) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::Invalid(format!(
            "DATABRICKS_CONFIG_PROFILE={profile}: cannot read {}: {e}",
            file.display()
        ))
    })?;
    let mut section: Option<&str> = None;
    let mut found = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim());
            found |= name.trim() == profile;
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let key = match k.trim() {
                "host" => "host",
                "token" => "token",
                "client_id" => "client_id",
                "client_secret" => "client_secret",
                _ => continue,
            };
            out.push((key, v.trim().to_owned()));
        }
    }
    if !found {
        return Err(ConfigError::Invalid(format!(
            "DATABRICKS_CONFIG_PROFILE={profile}: no [{profile}] section in {}",
            file.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databricks_profile_reads_one_section() {
        let dir = std::env::temp_dir().join(format!("rb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(".databrickscfg");
        std::fs::write(
            &f,
            "[DEFAULT]\nhost = https://a.example\ntoken = dapi-a\n\n\
             # a service principal\n[sp]\nhost = https://b.example\n\
             client_id = abc\nclient_secret = s3cret\nauth_type = oauth-m2m\n",
        )
        .unwrap();
        let got = databricks_profile(&f, "sp").unwrap();
        assert_eq!(
            got,
            vec![
                ("host", "https://b.example".to_string()),
                ("client_id", "abc".to_string()),
                ("client_secret", "s3cret".to_string()),
            ]
        );
        let err = databricks_profile(&f, "nope").unwrap_err().to_string();
        assert!(err.contains("no [nope] section"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
