//! The lab's address plan: every name, address, port and path of the simulated pair, in one
//! place. With prefix `pv` and subnet 100:
//!
//! ```text
//!  root ns: bridge pv-mgmt 10.100.0.1/24 ── veth pv-n0m ── pv-n0:ibiz0 10.100.0.11 (+ system IP .10)
//!                                        ── veth pv-n1m ── pv-n1:ibiz0 10.100.0.12
//!                                        ── veth pv-wm  ── pv-w:ibiz0  10.100.0.13 (witness)
//!                                        ── veth pv-n0b ── pv-n0-bmc:bmc0 10.100.0.100 (n0's BMC)
//!                                        ── veth pv-n1b ── pv-n1-bmc:bmc0 10.100.0.101 (n1's BMC)
//!  pv-n0 ⇄ pv-n1 veth pairs: priv0 10.101.0.{1,2}, alink1 10.102.0.{1,2}, alink2 10.103.0.{1,2}
//!  business network: pv-n0:biz0 ── veth business/biz-n0 ── pv-c: bridge bizsw 10.255.255.254/8
//!                    pv-n1:biz0 ── veth business/biz-n1 ──┘ (a user's PC on the switch)
//! ```
//! Guests' NICs plug into `biz0` on their host; the client namespace `pv-c` is the business
//! switch and a user's PC on it, so it reaches a guest on either host and outlives a host's
//! power cut. The tiny guest takes 10.x.y.z/8 from its MAC (`images::guest_ip`).
//! Each host namespace runs an etcd member (:2379/:2380), an agent (:7701, and the A-Link set
//! :7710 for HA replicas: n0 listens on alink1/alink2, n1 dials them) and a controller
//! (API :7400); the witness runs only its etcd member. Each node has a simulated BMC
//! (`ipmi_sim`, IPMI over UDP :623) in a namespace of its own on the management network, so it
//! answers while its host is dead and cutting the host's links leaves it reachable.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::bail;

/// Default namespace and bridge prefix.
pub const DEFAULT_PREFIX: &str = "pv";
/// Default second octet of the lab's subnets.
pub const DEFAULT_SUBNET: u8 = 100;
/// Default state directory.
pub const DEFAULT_DIR: &str = "/var/lib/pairvisor-lab";

/// etcd client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd peer port.
pub const ETCD_PEER_PORT: u16 = 2380;
/// Agent port.
pub const AGENT_PORT: u16 = 7701;
/// Controller API port.
pub const API_PORT: u16 = 7400;
/// A-Link port of the agents' replicator (HA replica traffic).
pub const ALINK_PORT: u16 = 7710;
/// Host-side name of the management interface.
pub const MGMT_DEV: &str = "ibiz0";
/// Host-side bridge for guests' business NICs.
pub const BUSINESS_BRIDGE: &str = "biz0";
/// Business network name the agents offer.
pub const BUSINESS_NETWORK: &str = "business";
/// Storage group the agents offer.
pub const STORAGE_GROUP: &str = "sg0";
/// A BMC's interface in its namespace.
pub const BMC_DEV: &str = "bmc0";
/// The BMCs' IPMI port.
pub const BMC_PORT: u16 = 623;
/// IPMI user of the lab's BMCs that the controllers fence with.
pub const BMC_USER: &str = "fence";
/// Its password (a lab's, written into the controllers' config files).
pub const BMC_PASSWORD: &str = "fencepw";

/// The business switch in the client namespace.
pub const CLIENT_BRIDGE: &str = "bizsw";
/// The client's address on the business network (prefix /8, the tiny guests' network).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 254);

/// A point-to-point role link between the two hosts: (interface name, subnet offset).
pub const ROLE_LINKS: [(&str, u8); 3] = [("priv0", 1), ("alink1", 2), ("alink2", 3)];

/// One simulated host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Node name: "n0", "n1" or "w".
    pub name: &'static str,
    /// Index: 0, 1, 2 (the witness).
    pub index: u8,
}

impl Host {
    /// Whether this is the witness (etcd member only).
    pub fn is_witness(&self) -> bool {
        self.index == 2
    }
}

/// The two nodes and the witness.
pub const HOSTS: [Host; 3] = [
    Host {
        name: "n0",
        index: 0,
    },
    Host {
        name: "n1",
        index: 1,
    },
    Host {
        name: "w",
        index: 2,
    },
];

/// A lab's names and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    prefix: String,
    subnet: u8,
    dir: PathBuf,
}

impl Plan {
    /// A plan with namespace/bridge `prefix`, subnets `10.subnet.0.0/24` onwards, state in `dir`.
    pub fn new(prefix: &str, subnet: u8, dir: &Path) -> anyhow::Result<Plan> {
        let prefix_ok = (1..=8).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            bail!("lab prefix {prefix:?}: use 1-8 lower-case letters or digits");
        }
        if subnet > 250 {
            bail!("lab subnet {subnet}: use 0-250 (the lab takes 10.N.0.0/24 to 10.N+3.0.0/24)");
        }
        if !dir.is_absolute() {
            bail!("lab directory {} must be absolute", dir.display());
        }
        Ok(Plan {
            prefix: prefix.to_string(),
            subnet,
            dir: dir.to_path_buf(),
        })
    }

    /// pvctl's default endpoints: those of the default lab.
    pub fn default_endpoints() -> String {
        Plan {
            prefix: DEFAULT_PREFIX.into(),
            subnet: DEFAULT_SUBNET,
            dir: PathBuf::from(DEFAULT_DIR),
        }
        .endpoints()
    }

    /// The lab's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The prefix of its namespaces and bridge.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the lab's FT guests keep their RAM files (tmpfs): one directory per host below.
    pub fn ram_dir(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/pairvisor-lab-{}", self.prefix()))
    }

    /// The second octet of its subnets.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// Network namespace of `host`.
    pub fn ns(&self, host: &Host) -> String {
        format!("{}-{}", self.prefix, host.name)
    }

    /// Network namespace of the business network's client (and switch).
    pub fn client_ns(&self) -> String {
        format!("{}-c", self.prefix)
    }

    /// Root-namespace bridge of the management network.
    pub fn bridge(&self) -> String {
        format!("{}-mgmt", self.prefix)
    }

    /// Root-namespace end of `host`'s management veth.
    pub fn root_veth(&self, host: &Host) -> String {
        format!("{}-{}m", self.prefix, host.name)
    }

    /// Management address of the root namespace (the bridge).
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 1)
    }

    /// Management address of `host`.
    pub fn mgmt_ip(&self, host: &Host) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 11 + host.index)
    }

    /// Network namespace of node `host`'s BMC.
    pub fn bmc_ns(&self, host: &Host) -> String {
        format!("{}-{}-bmc", self.prefix, host.name)
    }

    /// Root-namespace end of the veth of node `host`'s BMC: its port on the management switch.
    pub fn bmc_veth(&self, host: &Host) -> String {
        format!("{}-{}b", self.prefix, host.name)
    }

    /// Management address of node `host`'s BMC.
    pub fn bmc_ip(&self, host: &Host) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 100 + host.index)
    }

    /// The floating system IP.
    pub fn system_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 10)
    }

    /// Address of node `host` on the role link with subnet `offset`.
    pub fn link_ip(&self, offset: u8, host: &Host) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet + offset, 0, 1 + host.index)
    }

    /// The other node of the pair (for the witness: n0's peer).
    pub fn peer(host: &Host) -> &'static Host {
        &HOSTS[usize::from(1 - host.index.min(1))]
    }

    /// The heartbeat paths of node `host` to the other node: (name, local address, peer
    /// address) on each role link, then the management network.
    pub fn heartbeat_paths(&self, host: &Host) -> Vec<(&'static str, Ipv4Addr, Ipv4Addr)> {
        let peer = Plan::peer(host);
        ROLE_LINKS
            .iter()
            .map(|(name, offset)| {
                (
                    *name,
                    self.link_ip(*offset, host),
                    self.link_ip(*offset, peer),
                )
            })
            .chain(std::iter::once((
                "mgmt",
                self.mgmt_ip(host),
                self.mgmt_ip(peer),
            )))
            .collect()
    }

    /// The A-Link side of node `host`: its role (`"listen"` or `"connect"`) and the link
    /// addresses, which are the first node's on alink1 and alink2: it listens, the second
    /// node dials them.
    pub fn alink(&self, host: &Host) -> (&'static str, Vec<SocketAddr>) {
        let role = if host.index == 0 { "listen" } else { "connect" };
        let links = ROLE_LINKS
            .iter()
            .filter(|(name, _)| name.starts_with("alink"))
            .map(|(_, offset)| SocketAddr::from((self.link_ip(*offset, &HOSTS[0]), ALINK_PORT)))
            .collect();
        (role, links)
    }

    /// pvctl endpoints: the system IP, then both controllers.
    pub fn endpoints(&self) -> String {
        let nodes = HOSTS.iter().filter(|h| !h.is_witness());
        std::iter::once(self.system_ip())
            .chain(nodes.map(|h| self.mgmt_ip(h)))
            .map(|ip| format!("{ip}:{API_PORT}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcd client endpoints of all members for a daemon on `host`: its own host's member
    /// first, then the witness, then the peer's. A daemon's etcd client stays with the member
    /// that answers; the peer's member is the one most likely to vanish with the peer (and a
    /// lease renewal stuck on it can make an agent self-fence while its own side has quorum).
    pub fn etcd_endpoints_from(&self, host: &Host) -> Vec<String> {
        let mut hosts: Vec<&Host> = HOSTS.iter().collect();
        hosts.sort_by_key(|h| (h.name != host.name, !h.is_witness()));
        hosts
            .into_iter()
            .map(|h| format!("{}:{ETCD_CLIENT_PORT}", self.mgmt_ip(h)))
            .collect()
    }

    /// etcd client endpoints of all members.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        HOSTS
            .iter()
            .map(|h| format!("{}:{ETCD_CLIENT_PORT}", self.mgmt_ip(h)))
            .collect()
    }

    /// etcd's `--initial-cluster` value.
    pub fn etcd_initial_cluster(&self) -> String {
        HOSTS
            .iter()
            .map(|h| format!("{}=http://{}:{ETCD_PEER_PORT}", h.name, self.mgmt_ip(h)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// State directory of `host`.
    pub fn host_dir(&self, host: &Host) -> PathBuf {
        self.dir.join(host.name)
    }

    /// Directory of PID files.
    pub fn pid_dir(&self) -> PathBuf {
        self.dir.join("pids")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::new("pv", 100, Path::new("/var/lib/pvlab")).unwrap()
    }

    #[test]
    fn endpoints_start_with_system_ip() {
        let endpoints = plan().endpoints();

        assert_eq!(
            endpoints,
            "10.100.0.10:7400,10.100.0.11:7400,10.100.0.12:7400"
        );
    }

    #[test]
    fn etcd_endpoints_from_second_node_start_with_its_own_member_then_the_witness() {
        let endpoints = plan().etcd_endpoints_from(&HOSTS[1]);

        assert_eq!(
            endpoints,
            ["10.100.0.12:2379", "10.100.0.13:2379", "10.100.0.11:2379"]
        );
    }

    #[test]
    fn link_ip_of_second_node_on_alink2() {
        let ip = plan().link_ip(3, &HOSTS[1]);

        assert_eq!(ip, Ipv4Addr::new(10, 103, 0, 2));
    }

    #[test]
    fn heartbeat_paths_of_second_node_point_at_first() {
        let paths = plan().heartbeat_paths(&HOSTS[1]);

        assert_eq!(
            paths[3],
            (
                "mgmt",
                Ipv4Addr::new(10, 100, 0, 12),
                Ipv4Addr::new(10, 100, 0, 11)
            )
        );
        assert_eq!(
            paths[0],
            (
                "priv0",
                Ipv4Addr::new(10, 101, 0, 2),
                Ipv4Addr::new(10, 101, 0, 1)
            )
        );
    }

    #[test]
    fn alink_of_first_node_listens_on_its_alink_addresses() {
        let (role, links) = plan().alink(&HOSTS[0]);

        assert_eq!(role, "listen");
        assert_eq!(
            links,
            [
                "10.102.0.1:7710".parse::<SocketAddr>().unwrap(),
                "10.103.0.1:7710".parse().unwrap()
            ]
        );
    }

    #[test]
    fn alink_of_second_node_dials_the_first() {
        let (role, links) = plan().alink(&HOSTS[1]);

        assert_eq!(role, "connect");
        assert_eq!(
            links,
            [
                "10.102.0.1:7710".parse::<SocketAddr>().unwrap(),
                "10.103.0.1:7710".parse().unwrap()
            ]
        );
    }

    #[test]
    fn etcd_initial_cluster_lists_all_three_members() {
        let cluster = plan().etcd_initial_cluster();

        assert_eq!(
            cluster,
            "n0=http://10.100.0.11:2380,n1=http://10.100.0.12:2380,w=http://10.100.0.13:2380"
        );
    }

    #[test]
    fn bmc_ip_of_second_node_is_101() {
        let ip = plan().bmc_ip(&HOSTS[1]);

        assert_eq!(ip, Ipv4Addr::new(10, 100, 0, 101));
    }

    #[test]
    fn new_with_long_prefix_is_refused() {
        let err = Plan::new("toolongprefix", 100, Path::new("/x")).unwrap_err();

        assert!(err.to_string().contains("1-8 lower-case letters"));
    }

    #[test]
    fn names_fit_linux_interface_limit() {
        let plan = Plan::new("abcdefgh", 100, Path::new("/x")).unwrap();

        assert!(plan.bridge().len() <= 15);
        assert!(plan.root_veth(&HOSTS[0]).len() <= 15);
        assert!(plan.bmc_veth(&HOSTS[1]).len() <= 15);
    }
}
