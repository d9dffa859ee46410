//! The agent's configuration file (TOML).
//!
//! ```toml
//! node = "n0"
//! listen = "10.100.0.11:7701"
//! state_dir = "/var/lib/pairvisor/agent"
//! image_dir = "/var/lib/pairvisor/images"
//! domain_type = "kvm"                 # "qemu" (TCG, the default) or "kvm"
//! # libvirt_uri = "qemu:///system"    # default: embedded driver in <state_dir>/libvirt
//! etcd_endpoints = ["10.100.0.11:2379", "10.100.0.12:2379", "10.100.0.13:2379"]
//! host_lease_ttl_seconds = 2          # how fast the pair learns this host is gone
//! [heartbeat]                         # UDP heartbeats to the peer on every path
//! port = 7702
//! interval_ms = 100
//! paths = [{ name = "priv0", local = "10.101.0.1", peer = "10.101.0.2" }]
//! [system_ip]                         # optional: dropped here whenever another host serves
//! address = "10.100.0.10/24"
//! device = "ibiz0"
//! [storage_groups]
//! sg0 = "/var/lib/pairvisor/storage/sg0"
//! [networks]
//! business = "biz0"                   # network name = host bridge
//! [alink]                             # optional: the HA replica service over the A-Links
//! role = "listen"                     # "listen" on one host, "connect" on the other
//! links = ["10.102.0.1:7710", "10.103.0.1:7710"]  # listen: this host's; connect: the peer's
//! [tls]                               # the agent API admits only the controllers
//! cert = "/etc/pairvisor/pki/n0-agent.pem"
//! key = "/etc/pairvisor/pki/n0-agent.key"
//! ca = "/etc/pairvisor/pki/controllers-ca.pem"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::domain::DomainType;
use crate::heartbeat::PathConfig;

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
    /// A path in the file is relative.
    #[error("{key} = {path} in {file} must be an absolute path")]
    RelativePath {
        /// Config file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The relative path.
        path: PathBuf,
    },
}

/// Agent configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's node name, as the pair knows it.
    pub node: String,
    /// Address of the agent's gRPC service.
    pub listen: SocketAddr,
    /// Address the controllers reach the agent at, if not `listen` (e.g. listening on 0.0.0.0).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory for the embed root, serial logs and other agent state.
    pub state_dir: PathBuf,
    /// Directory of boot images, one subdirectory per image.
    pub image_dir: PathBuf,
    /// Where FT guests' RAM files go (on tmpfs): the embed root's `memory_backing_dir`.
    #[serde(default = "default_ram_dir")]
    pub ram_dir: PathBuf,
    /// libvirt connection; default: the embedded QEMU driver rooted in `state_dir/libvirt`.
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    /// How QEMU runs guests.
    #[serde(default = "default_domain_type")]
    pub domain_type: DomainType,
    /// QEMU binary.
    #[serde(default = "default_emulator")]
    pub emulator: PathBuf,
    /// The FT shim preloaded into FT guests' QEMU so that the kernel tracks their RAM writes
    /// (`libpvftshim.so`, built with the agent); default: the one next to the agent's
    /// executable, if there is one. Without it, FT hashes all of guest RAM every epoch.
    #[serde(default)]
    pub ft_shim: Option<PathBuf>,
    /// Storage groups: name → directory holding the volumes.
    #[serde(default)]
    pub storage_groups: BTreeMap<String, PathBuf>,
    /// Business networks: name → host bridge.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// etcd client endpoints of all three members; empty runs the agent alone (no host lease,
    /// no registration: for tests of the agent by itself).
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// TTL of the host lease: how soon the pair learns this host is gone.
    #[serde(default = "default_host_lease_ttl")]
    pub host_lease_ttl_seconds: u64,
    /// Heartbeats to the peer.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// The pair's floating system IP, if it has one: released on this host whenever another
    /// host serves.
    #[serde(default)]
    pub system_ip: Option<daemon::sysip::SystemIp>,
    /// The A-Links to the peer, carrying HA replica traffic; without them this host serves no
    /// replicas and mirrors to none.
    #[serde(default)]
    pub alink: Option<AlinkConfig>,
    /// TLS of the agent API: its certificate and key, and the CA of the only clients it
    /// admits (the controllers'). Without it the API is plain HTTP/2, for tests only.
    #[serde(default)]
    pub tls: Option<proto::transport::TlsFiles>,
}

/// The A-Link set to the peer (see `replicator`): one host listens, the other connects.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlinkConfig {
    /// Whether this host listens on its A-Link addresses or dials the peer's.
    pub role: AlinkRole,
    /// One address per link: this host's (listen) or the peer's (connect).
    pub links: Vec<SocketAddr>,
    /// TLS on the links. Without it they are plain TCP, for tests only.
    #[serde(default)]
    pub tls: Option<AlinkTls>,
}

/// The A-Links' TLS: both hosts present their certificate and admit only one of the pair's
/// agents' CA; the dialing host also checks that the listener's names the peer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlinkTls {
    /// This host's certificate (PEM; good for server and client use).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The agents' CA certificate (PEM): the only CA the peer's certificate may chain to.
    pub ca: PathBuf,
    /// The peer host's name, as its certificate carries it (checked by the dialing host).
    pub peer: String,
}

/// The side of the A-Link set a host takes; the two hosts take different sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlinkRole {
    /// Accept the peer's connections on this host's addresses.
    Listen,
    /// Dial the peer's addresses.
    Connect,
}

/// Heartbeats to the peer on every path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// UDP port, the same on every path and on both hosts.
    #[serde(default = "default_heartbeat_port")]
    pub port: u16,
    /// Milliseconds between heartbeats (at most 200).
    #[serde(default = "default_heartbeat_interval")]
    pub interval_ms: u64,
    /// The paths to the peer.
    #[serde(default)]
    pub paths: Vec<PathConfig>,
}

impl Default for HeartbeatConfig {
    fn default() -> HeartbeatConfig {
        HeartbeatConfig {
            port: default_heartbeat_port(),
            interval_ms: default_heartbeat_interval(),
            paths: Vec::new(),
        }
    }
}

fn default_host_lease_ttl() -> u64 {
    2
}

fn default_heartbeat_port() -> u16 {
    7702
}

fn default_heartbeat_interval() -> u64 {
    100
}

fn default_ram_dir() -> PathBuf {
    PathBuf::from(crate::embed::DEFAULT_RAM_DIR)
}

fn default_domain_type() -> DomainType {
    DomainType::Qemu
}

fn default_emulator() -> PathBuf {
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}

impl Config {
    /// The FT shim to preload: the configured one, or the one next to this executable.
    pub fn ft_shim(&self) -> Option<PathBuf> {
        self.ft_shim.clone().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let shim = exe.parent()?.join(crate::ft::SHIM_FILE);
            shim.is_file().then_some(shim)
        })
    }

    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        daemon::config::load_checked(path)
    }

    /// Parses and checks config text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        daemon::config::parse_checked(text, path)
    }

    /// The libvirt URI: configured, or the embed root under the state directory.
    pub fn libvirt_uri(&self) -> String {
        self.libvirt_uri
            .clone()
            .unwrap_or_else(|| format!("qemu:///embed?root={}", self.embed_root().display()))
    }

    /// The embedded driver's root directory (used when no URI is configured).
    pub fn embed_root(&self) -> PathBuf {
        self.state_dir.join("libvirt")
    }

    /// The address the controllers reach this agent at: `advertise`, else `listen`.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Directory of the guests' serial logs.
    pub fn serial_dir(&self) -> PathBuf {
        self.state_dir.join("serial")
    }
}

impl daemon::config::Checked for Config {
    type Error = Error;

    /// Checks that every path in the file is absolute and the timings are in range.
    fn check(&self, file: &Path) -> Result<(), Error> {
        let invalid = |key, reason: &str| Error::Invalid {
            file: file.to_path_buf(),
            key,
            reason: reason.to_string(),
        };
        if !(2..=60).contains(&self.host_lease_ttl_seconds) {
            return Err(invalid(
                "host_lease_ttl_seconds",
                "must be 2 to 60 (etcd's minimum TTL is about 2 s)",
            ));
        }
        if !(10..=200).contains(&self.heartbeat.interval_ms) {
            return Err(invalid(
                "heartbeat.interval_ms",
                "must be 10 to 200: host health needs a heartbeat at least every 200 ms",
            ));
        }
        if self.alink.as_ref().is_some_and(|a| a.links.is_empty()) {
            return Err(invalid(
                "alink.links",
                "must name at least one address (one per A-Link)",
            ));
        }
        let fixed = [
            ("state_dir".to_string(), &self.state_dir),
            ("image_dir".to_string(), &self.image_dir),
            ("emulator".to_string(), &self.emulator),
        ];
        let groups = self
            .storage_groups
            .iter()
            .map(|(name, dir)| (format!("storage_groups.{name}"), dir));
        for (key, path) in fixed.into_iter().chain(groups) {
            if path.is_relative() {
                return Err(Error::RelativePath {
                    file: file.to_path_buf(),
                    key,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node = "n0"
listen = "127.0.0.1:7701"
state_dir = "/var/lib/pv"
image_dir = "/var/lib/pv/images"
[storage_groups]
sg0 = "/var/lib/pv/sg0"
"#;

    #[test]
    fn parse_minimal_config_defaults_to_tcg_embed_root() {
        let config = Config::parse(MINIMAL, Path::new("agent.toml")).unwrap();

        assert_eq!(config.domain_type, DomainType::Qemu);
        assert_eq!(
            config.libvirt_uri(),
            "qemu:///embed?root=/var/lib/pv/libvirt"
        );
    }

    #[test]
    fn parse_kvm_and_system_uri_are_taken_as_given() {
        let text = format!("{MINIMAL}\n");
        let text = text.replacen(
            "node = \"n0\"",
            "node = \"n0\"\ndomain_type = \"kvm\"\nlibvirt_uri = \"qemu:///system\"",
            1,
        );

        let config = Config::parse(&text, Path::new("agent.toml")).unwrap();

        assert_eq!(config.domain_type, DomainType::Kvm);
        assert_eq!(config.libvirt_uri(), "qemu:///system");
    }

    #[test]
    fn parse_relative_storage_group_is_refused_with_its_key() {
        let text = MINIMAL.replace("\"/var/lib/pv/sg0\"", "\"sg0\"");

        let err = Config::parse(&text, Path::new("agent.toml")).unwrap_err();

        assert_eq!(
            err.to_string(),
            "storage_groups.sg0 = sg0 in agent.toml must be an absolute path"
        );
    }

    #[test]
    fn parse_without_alink_has_no_replica_links() {
        let config = Config::parse(MINIMAL, Path::new("agent.toml")).unwrap();

        assert_eq!(config.alink, None);
    }

    #[test]
    fn parse_alink_section_reads_role_and_links() {
        let text = format!(
            "{MINIMAL}[alink]\nrole = \"connect\"\nlinks = [\"10.102.0.1:7710\", \"10.103.0.1:7710\"]\n"
        );

        let config = Config::parse(&text, Path::new("agent.toml")).unwrap();

        assert_eq!(
            config.alink,
            Some(AlinkConfig {
                role: AlinkRole::Connect,
                links: vec![
                    "10.102.0.1:7710".parse().unwrap(),
                    "10.103.0.1:7710".parse().unwrap()
                ],
                tls: None,
            })
        );
    }

    #[test]
    fn parse_alink_tls_reads_its_files_and_peer() {
        let text = format!(
            "{MINIMAL}[alink]\nrole = \"listen\"\nlinks = [\"10.102.0.1:7710\"]\n[alink.tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nca = \"agents-ca.pem\"\npeer = \"n1\"\n"
        );

        let config = Config::parse(&text, Path::new("agent.toml")).unwrap();

        let tls = config.alink.and_then(|a| a.tls).unwrap();
        assert_eq!(
            (tls.ca, tls.peer),
            (PathBuf::from("agents-ca.pem"), "n1".to_string())
        );
    }

    #[test]
    fn parse_alink_without_links_is_refused_with_its_key() {
        let text = format!("{MINIMAL}[alink]\nrole = \"listen\"\nlinks = []\n");

        let err = Config::parse(&text, Path::new("agent.toml")).unwrap_err();

        assert_eq!(
            err.to_string(),
            "alink.links in agent.toml: must name at least one address (one per A-Link)"
        );
    }

    #[test]
    fn parse_alink_unknown_role_is_refused() {
        let text = format!("{MINIMAL}[alink]\nrole = \"both\"\nlinks = [\"10.102.0.1:7710\"]\n");

        let err = Config::parse(&text, Path::new("agent.toml")).unwrap_err();

        assert!(matches!(
            err,
            Error::File(daemon::config::ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn parse_unknown_key_is_refused() {
        let text = MINIMAL.replacen("node = ", "bogus = 1\nnode = ", 1);

        let err = Config::parse(&text, Path::new("agent.toml")).unwrap_err();

        assert!(matches!(
            err,
            Error::File(daemon::config::ConfigError::Parse { .. })
        ));
    }
}
