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
//! [bmc.n0]                              # optional, per node: fence it through its BMC
//! address = "10.100.0.100"              # IPMI 2.0 (lanplus) on the management network
//! user = "fence"                        # may control the chassis power
//! password = "fencepw"                  # 1-20 bytes; keep this file mode 0600
//! [bmc.n1]
//! address = "10.100.0.101"
//! port = 623                            # the default
//! user = "fence"
//! password = "fencepw"
//! [agent_tls]                           # calls to the agents: this controller's certificate
//! cert = "/etc/pairvisor/pki/n0-controller.pem"
//! key = "/etc/pairvisor/pki/n0-controller.key"
//! ca = "/etc/pairvisor/pki/ca.pem"      # the CA the agents' certificates chain to
//! [api_tls]                             # the public API's TLS
//! cert = "/etc/pairvisor/pki/n0-api.pem"
//! key = "/etc/pairvisor/pki/n0-api.key"
//! ca = "/etc/pairvisor/pki/ca.pem"      # the CA the peer controller's API chains to
//! [auth]                                # every API call needs a token
//! tokens_file = "/etc/pairvisor/tokens.json"  # the install's tokens (hashes), e.g. the first admin's
//! ```
//!
//! Fencing (see `docs/fencing.md`): when a host is lost, the serving controller waits
//! `fence_delay_ms`, then powers the host off through its `[bmc.<node>]` and fails its HA VMs
//! over once the BMC says off. Give the delay to one host only (e.g. 1000 on n1, 0 on n0): if
//! both controllers ever acted at once they would fence each other, and one must lose the race.
//! A host without a BMC entry, or whose BMC does not answer, is trusted to have stopped its HA
//! VMs itself (its agent self-fences before its lease can expire): its VMs fail over once it
//! has been lost for the self-fence margin of `host_lease_ttl_seconds`, which must be the TTL
//! the agents use. The password in this file is fine for a lab; in production keep the file
//! readable by root only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::bmc::Bmc;
use crate::placement::Policy;

/// The longest fence delay: beyond it a lost host's HA VMs wait too long.
const MAX_FENCE_DELAY_MS: u64 = 60_000;

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
    /// The hosts' BMCs by node: a lost host is powered off through its BMC before its HA VMs
    /// fail over.
    #[serde(default)]
    pub bmc: BTreeMap<String, Bmc>,
    /// How long this controller waits before fencing a lost host (one host of the pair only).
    #[serde(default)]
    pub fence_delay_ms: u64,
    /// TTL of the agents' host leases, as in their config: without a fence, a lost host's HA
    /// VMs wait for its self-fence margin.
    #[serde(default = "default_host_lease_ttl")]
    pub host_lease_ttl_seconds: u64,
    /// How often an HA VM whose QEMU died on its own is restarted on its host before it is
    /// moved to the peer (recover locally first).
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// This controller's client certificate and key for the agent API, and the CA the
    /// agents' certificates chain to. Without it the agents are called in plain HTTP/2
    /// (tests only).
    #[serde(default)]
    pub agent_tls: Option<proto::transport::TlsFiles>,
    /// The public API's certificate and key, and the CA the peer controller's chains to (a
    /// call this controller forwards goes to the peer's API). Without it the API is plain
    /// HTTP/2 (tests only).
    #[serde(default)]
    pub api_tls: Option<proto::transport::TlsFiles>,
    /// Tokens: every API call must carry one. Without it the API admits every call (tests
    /// only).
    #[serde(default)]
    pub auth: Option<Auth>,
}

/// The `[auth]` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// A JSON list of token records (`proto::auth::TokenRecord`: hashes, no secrets) known
    /// besides those made through the API: the install's first admin token.
    pub tokens_file: PathBuf,
}

/// How the serving controller fences a lost host, from its [`Config`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fencing {
    /// The hosts' BMCs by node.
    pub bmcs: BTreeMap<String, Bmc>,
    /// The wait before a fence.
    pub delay: Duration,
    /// How long a host must have been lost (its lease expired) before its HA VMs fail over
    /// without a fence: its agent's self-fence margin.
    pub self_fence_margin: Duration,
}

fn default_lease_ttl() -> i64 {
    3
}

fn default_host_lease_ttl() -> u64 {
    2
}

fn default_max_restarts() -> u32 {
    1
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

    /// What the engine needs to fence a lost host.
    pub fn fencing(&self) -> Fencing {
        Fencing {
            bmcs: self.bmc.clone(),
            delay: Duration::from_millis(self.fence_delay_ms),
            self_fence_margin: daemon::lease::self_fence_margin(Duration::from_secs(
                self.host_lease_ttl_seconds,
            )),
        }
    }

    /// Checks the fencing keys.
    fn check_fencing(&self, path: &Path) -> Result<(), Error> {
        let invalid = |key, reason: String| Error::Invalid {
            file: path.to_path_buf(),
            key,
            reason,
        };
        if self.fence_delay_ms > MAX_FENCE_DELAY_MS {
            return Err(invalid(
                "fence_delay_ms",
                format!("must be 0 to {MAX_FENCE_DELAY_MS}"),
            ));
        }
        if !(2..=60).contains(&self.host_lease_ttl_seconds) {
            return Err(invalid(
                "host_lease_ttl_seconds",
                "must be 2 to 60, the agents' value".into(),
            ));
        }
        for (node, bmc) in &self.bmc {
            bmc.check()
                .map_err(|reason| invalid("bmc", format!("[bmc.{node}] {reason}")))?;
        }
        Ok(())
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
        self.check_fencing(path)
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
        assert_eq!(
            config.fencing(),
            Fencing {
                bmcs: BTreeMap::new(),
                delay: Duration::ZERO,
                self_fence_margin: Duration::from_millis(300),
            }
        );
    }

    #[test]
    fn parse_bmc_entries_give_fencing() {
        let text = format!(
            "{MINIMAL}fence_delay_ms = 1000\n[bmc.n0]\naddress = \"10.100.0.100\"\nuser = \"fence\"\npassword = \"fencepw\"\n"
        );

        let fencing = Config::parse(&text, Path::new("c.toml")).unwrap().fencing();

        assert_eq!(fencing.delay, Duration::from_secs(1));
        assert_eq!(fencing.bmcs["n0"].address, "10.100.0.100");
        assert_eq!(fencing.bmcs["n0"].port, 623);
    }

    #[test]
    fn parse_bmc_without_password_is_refused() {
        let text = format!(
            "{MINIMAL}[bmc.n0]\naddress = \"10.100.0.100\"\nuser = \"fence\"\npassword = \"\"\n"
        );

        let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();

        assert!(
            err.to_string()
                .starts_with("bmc in c.toml: [bmc.n0] password")
        );
    }

    #[test]
    fn parse_fence_delay_above_a_minute_is_refused() {
        let text = format!("fence_delay_ms = 60001\n{MINIMAL}");

        let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();

        assert!(err.to_string().starts_with("fence_delay_ms in c.toml"));
    }

    #[test]
    fn parse_ttl_below_two_is_refused() {
        let text = format!("lease_ttl_seconds = 1\n{MINIMAL}");

        let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();

        assert!(err.to_string().starts_with("lease_ttl_seconds in c.toml"));
    }
}
