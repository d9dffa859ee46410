//! The command line of `pvctl lab`: its verbs, their options, and which module runs each.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Plan, bmc, faults, shaping};

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Create the hosts, networks, etcd members, agents and controllers (safe to re-run).
    Up(LabArgs),
    /// Stop everything the lab started (by PID) and remove its networks and data.
    Down {
        #[command(flatten)]
        lab: LabArgs,
        /// Keep the lab's data directory (VM disks, etcd data).
        #[arg(long)]
        keep_data: bool,
    },
    /// Show the lab's processes and addresses.
    Status(LabArgs),
    /// Cut a node's power: kill -9 every process in its namespace (guests too), drop the system
    /// IP, take its links down.
    KillHost {
        /// The node: n0 or n1.
        host: String,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Power a node on again: links up, then its etcd member, agent and controller.
    RestoreHost {
        /// The node: n0 or n1.
        host: String,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Drop every packet between a node and the other node, the system IP and the witness
    /// (links stay up).
    Isolate {
        /// The node: n0 or n1.
        host: String,
        /// Keep the node's traffic to and from the witness flowing.
        #[arg(long)]
        keep_witness: bool,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Drop one path between a node and the other node (faults add up until heal).
    CutPath {
        /// The node: n0 or n1.
        host: String,
        /// The path: priv0, alink1, alink2 or mgmt (management traffic to the other node).
        path: String,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Make a node's BMC unreachable (its management switch port goes down) until heal.
    CutBmc {
        /// The node: n0 or n1.
        host: String,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Hold what a node sends on one link to a byte rate (queued, not dropped) until heal.
    SlowPath {
        /// The node: n0 or n1.
        host: String,
        /// The link: priv0, alink1 or alink2.
        path: String,
        /// What the node may send on it per second.
        #[arg(long)]
        bytes_per_second: u64,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Remove every isolate, cut-path and slow-path fault from the lab; reconnect cut BMCs.
    Heal(LabArgs),
    /// A BMC's chassis control: ipmi_sim runs it with `get power`, `set power 0|1`, ….
    #[command(hide = true)]
    BmcHook {
        /// The node whose BMC asks.
        host: String,
        /// get or set.
        op: String,
        /// What to get, or parameter and value pairs to set.
        #[arg(allow_hyphen_values = true)]
        params: Vec<String>,
        #[command(flatten)]
        lab: LabArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Directory for the lab's state, disks and logs.
    #[arg(long, env = "PV_LAB_DIR", default_value = super::plan::DEFAULT_DIR)]
    dir: PathBuf,
    /// Prefix of the lab's namespaces and bridge.
    #[arg(long, env = "PV_LAB_PREFIX", default_value = super::plan::DEFAULT_PREFIX)]
    prefix: String,
    /// Second octet of the lab's subnets (10.N.0.0/24 management, N+1..N+3 private links).
    #[arg(long, env = "PV_LAB_SUBNET", default_value_t = super::plan::DEFAULT_SUBNET)]
    subnet: u8,
}

impl LabArgs {
    /// The lab these options name.
    fn plan(&self) -> anyhow::Result<Plan> {
        Plan::new(&self.prefix, self.subnet, &self.dir)
    }
}

/// Runs `pvctl lab COMMAND`.
pub async fn run(command: LabCmd) -> anyhow::Result<()> {
    match command {
        LabCmd::Up(args) => super::up(&args.plan()?).await,
        LabCmd::Down {
            lab: args,
            keep_data,
        } => super::down(&args.plan()?, keep_data),
        LabCmd::Status(args) => {
            print!("{}", super::status(&args.plan()?));
            Ok(())
        }
        LabCmd::KillHost { host, lab: args } => faults::kill_host(&args.plan()?, &host),
        LabCmd::RestoreHost { host, lab: args } => faults::restore_host(&args.plan()?, &host),
        LabCmd::Isolate {
            host,
            keep_witness,
            lab: args,
        } => faults::isolate(&args.plan()?, &host, keep_witness),
        LabCmd::CutPath {
            host,
            path,
            lab: args,
        } => faults::cut_path(&args.plan()?, &host, &path),
        LabCmd::SlowPath {
            host,
            path,
            bytes_per_second,
            lab: args,
        } => shaping::slow_path(&args.plan()?, &host, &path, bytes_per_second),
        LabCmd::CutBmc { host, lab: args } => bmc::cut(&args.plan()?, &host),
        LabCmd::Heal(args) => faults::heal(&args.plan()?),
        LabCmd::BmcHook {
            host,
            op,
            params,
            lab: args,
        } => bmc::hook(&args.plan()?, &host, &op, &params),
    }
}
