//! The controller's configuration file (TOML).
//!
//! ```toml
//! node = "n0"
//! listen = "0.0.0.0:7400"               # public API (also reachable on the system IP)
//! api_address = "10.100.0.11:7400"      # where the peer controller forwards API calls
//! etcd_endpoints = ["10.100.0.11:2379", "10.100.0.12:2379", "10.100.0.13:2379"]
//! lease_ttl_seconds = 2                 # how soon the peer takes over from a dead controller
//! [system_ip]                           # optional: the floating IP of the serving controller
//! address = "10.100.0.10/24"
//! device = "ibiz0"
//! [capacity]
//! reserve_vcpus = 2
//! reserve_memory_mib = 4096
//! vcpu_overcommit = 1
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::placement::Policy;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read or parsed.
    #[error(transparent)]
    File(#[from] daemon::config::ConfigError),
    /// A value is out of range.
    #[error("{key} in {file}: {reason}")]
    Invalid {
        /// Config file.
        file: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

pub use daemon::sysip::SystemIp;

/// Controller configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// Where the public API listens.
    pub listen: SocketAddr,
    /// Address under which the peer reaches this controller's API.
    pub api_address: String,
    /// etcd client endpoints of all three members (host:port).
    pub etcd_endpoints: Vec<String>,
    /// TTL of this controller's etcd lease: how fast the peer takes over when it dies.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: i64,
    /// The floating system IP, if this pair has one.
    #[serde(default)]
    pub system_ip: Option<SystemIp>,
    /// System reserve and overcommit for capacity accounting.
    #[serde(default)]
    pub capacity: Policy,
}

fn default_lease_ttl() -> i64 {
    3
}

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        daemon::config::load_checked(path)
    }

    /// Parses and checks config text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        daemon::config::parse_checked(text, path)
    }
}

impl daemon::config::Checked for Config {
    type Error = Error;

    /// Checks the values TOML cannot constrain.
    fn check(&self, path: &Path) -> Result<(), Error> {
        let invalid = |key, reason: &str| Error::Invalid {
            file: path.to_path_buf(),
            key,
            reason: reason.to_string(),
        };
        if !(2..=60).contains(&self.lease_ttl_seconds) {
            return Err(invalid(
                "lease_ttl_seconds",
                "must be 2 to 60 (etcd's minimum TTL is about 2 s)",
            ));
        }
        if self.etcd_endpoints.is_empty() {
            return Err(invalid(
                "etcd_endpoints",
                "list the client endpoints of all three etcd members",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node = "n0"
listen = "0.0.0.0:7400"
api_address = "10.100.0.11:7400"
etcd_endpoints = ["10.100.0.11:2379"]
"#;

    #[test]
    fn parse_minimal_config_uses_defaults() {
        let config = Config::parse(MINIMAL, Path::new("c.toml")).unwrap();

        assert_eq!(config.lease_ttl_seconds, 3);
        assert_eq!(config.capacity, Policy::default());
        assert_eq!(config.system_ip, None);
    }

    #[test]
    fn parse_ttl_below_two_is_refused() {
        let text = format!("lease_ttl_seconds = 1\n{MINIMAL}");

        let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();

        assert!(err.to_string().starts_with("lease_ttl_seconds in c.toml"));
    }
}
