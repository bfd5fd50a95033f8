//! Named connection contexts from a config file, in the spirit of
//! `nats context` and `kcat -F`: endpoints, namespace, TLS files, user and
//! timeout saved under a name, chosen with `--context` or the file's
//! default. Options and environment variables given win over the context.
//!
//! ```toml
//! context = "prod"                 # used when --context is not given
//!
//! [contexts.prod]
//! endpoints = ["10.0.0.1:2379", "10.0.0.2:2379"]
//! namespace = "billing"
//! user = "alice"                   # password from PUBSUB_ETCD_PASSWORD
//! cacert = "/etc/etcd/ca.pem"
//! timeout = "5s"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Serialize};

use crate::cli::ConnectionArgs;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "PUBSUB_ETCD_CONFIG";

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The context used when none is named.
    pub context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One named context; every setting is optional.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cacert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `$PUBSUB_ETCD_CONFIG`, else `$XDG_CONFIG_HOME/pubsub-etcd/config.toml`,
/// else `~/.config/pubsub-etcd/config.toml`.
pub fn path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CONFIG_ENV) {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("pubsub-etcd").join("config.toml"))
}

/// Reads the config file; a file that does not exist is an empty one.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl ConfigFile {
    /// The context `--context` names, or the file's default, if any.
    pub fn selected(&self, named: Option<&str>) -> Result<Option<(&str, &Context)>, String> {
        let Some(name) = named.or(self.context.as_deref()) else {
            return Ok(None);
        };
        match self.contexts.get_key_value(name) {
            Some((name, context)) => Ok(Some((name.as_str(), context))),
            None => {
                let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
                Err(format!(
                    "no context {name:?} in the config file (contexts: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            }
        }
    }
}

/// Fills the connection settings not given as options or environment
/// variables from the selected context.
pub fn apply(
    context: &Context,
    matches: &ArgMatches,
    args: &mut ConnectionArgs,
) -> Result<(), String> {
    let unset = |id: &str| {
        matches!(
            matches.value_source(id),
            None | Some(ValueSource::DefaultValue)
        )
    };
    if let (true, Some(endpoints)) = (unset("endpoints"), &context.endpoints) {
        args.endpoints = endpoints.clone();
    }
    if let (true, Some(namespace)) = (unset("namespace"), &context.namespace) {
        args.namespace = namespace.clone();
    }
    if let (true, Some(user)) = (unset("user"), &context.user) {
        args.user = Some(user.clone());
    }
    if let (true, Some(cacert)) = (unset("cacert"), &context.cacert) {
        args.cacert = Some(cacert.clone());
    }
    // A certificate and its key go together: both from the options, or both
    // from the context.
    if let (true, true, Some(cert), Some(key)) =
        (unset("cert"), unset("key"), &context.cert, &context.key)
    {
        args.cert = Some(cert.clone());
        args.key = Some(key.clone());
    }
    if let (true, Some(timeout)) = (unset("timeout"), &context.timeout) {
        let timeout = humantime::parse_duration(timeout)
            .map_err(|e| format!("timeout {timeout:?} of the context: {e}"))?;
        args.timeout = Some(timeout);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_selected_by_name_or_default() {
        let file: ConfigFile = toml::from_str(
            r#"
            context = "a"
            [contexts.a]
            namespace = "na"
            [contexts.b]
            endpoints = ["h:1"]
            "#,
        )
        .unwrap();
        assert_eq!(file.selected(None).unwrap().unwrap().0, "a");
        assert_eq!(file.selected(Some("b")).unwrap().unwrap().0, "b");
        assert!(file
            .selected(Some("c"))
            .unwrap_err()
            .contains("contexts: a, b"));
        assert!(toml::from_str::<ConfigFile>("[contexts.a]\nendpoint = []").is_err());
    }
}
