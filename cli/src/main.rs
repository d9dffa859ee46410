//! `pvctl`: the Pairvisor command line, modelled on everRun's avcli. Every command takes
//! `--json`; the exit code is 0 only on success, so cron jobs and UPS scripts can rely on it.

mod access;
mod client;
mod export;
mod files;
mod import;
mod isos;
mod lab;
mod output;
mod progress;
mod snapshots;
mod units;
mod upload;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::output::{
    alerts_json, alerts_text, event_json, event_text, nodes_json, nodes_text, vm_json, vm_text,
    vms_table,
};

/// Pairvisor command line: manage the pair's nodes and VMs.
#[derive(Debug, Parser)]
#[command(version, name = "pvctl")]
struct Args {
    /// API endpoints, tried in order (host:port, comma separated) [default: the lab's system
    /// IP, then its two controllers].
    #[arg(long, global = true, env = "PVCTL_ENDPOINT")]
    endpoint: Option<String>,
    /// The pair's CA certificate: the API is called over TLS, trusting only it [default:
    /// /etc/pairvisor/pki/ca.pem, else the lab's, if there].
    #[arg(long, global = true, env = "PVCTL_CA")]
    ca: Option<PathBuf>,
    /// A file holding the token to present (PVCTL_TOKEN, the token's text, comes first)
    /// [default: the one `pvctl login` stored, else the lab's admin token, if readable].
    #[arg(long, global = true, env = "PVCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Give up on a request after this many seconds (vm-shutdown adds its grace period).
    #[arg(long, global = true, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Ft,
    Ha,
    Unprotected,
}

impl From<ModeArg> for pb::ProtectionMode {
    fn from(mode: ModeArg) -> pb::ProtectionMode {
        match mode {
            ModeArg::Ft => pb::ProtectionMode::Ft,
            ModeArg::Ha => pb::ProtectionMode::Ha,
            ModeArg::Unprotected => pb::ProtectionMode::Unprotected,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Api(ApiCmd),
    /// Run a whole two-node pair on this machine in network namespaces (needs root).
    Lab {
        #[command(subcommand)]
        command: lab::command::LabCmd,
    },
}

/// Commands on the pair's public API.
#[derive(Debug, Subcommand)]
enum ApiCmd {
    #[command(flatten)]
    Access(access::AccessCmd),
    #[command(flatten)]
    Snapshot(snapshots::SnapshotCmd),
    /// Show the nodes: which one serves, each host's health and heartbeat paths, capacity left.
    NodeInfo,
    /// Show the open alerts (a heartbeat path down, a host lost, a domain outside the API).
    Alerts {
        /// Also the alerts an admin cleared whose cause is still there.
        #[arg(long)]
        all: bool,
    },
    /// Clear an open alert by its ID (`pvctl alerts` lists them): it stays cleared while its
    /// cause stays as it is.
    AlertClear {
        /// The alert's ID.
        id: String,
    },
    /// Show the host-health timeouts, or change them (takes effect at once).
    HealthConfig {
        /// A heartbeat path is silent after this many milliseconds without a heartbeat.
        #[arg(long)]
        path_timeout_ms: Option<u64>,
        /// A host that looks dead on every signal is lost after this many more milliseconds.
        #[arg(long)]
        lost_confirm_ms: Option<u64>,
    },
    /// Create a VM (it starts stopped).
    VmCreate {
        /// VM name: 1-64 letters, digits, '-', '_', '.'.
        name: String,
        /// Protection mode.
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        cpu: u32,
        /// Memory, e.g. 512M or 2G (a bare number is MiB).
        #[arg(long, default_value = "256M")]
        memory: String,
        /// A disk: SIZE[:STORAGE_GROUP[:raw|qcow2]], e.g. 16M:sg0 (repeat for more disks).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// A business network to attach (repeat for more NICs).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// Boot from this kernel image of the nodes' image library (e.g. tiny).
        #[arg(long, conflicts_with = "iso", required_unless_present = "iso")]
        kernel_image: Option<String>,
        /// Boot from this ISO of the pair's ISO library (see iso-add; not a host path).
        #[arg(long)]
        iso: Option<String>,
    },
    /// Show one VM, or all VMs.
    VmInfo {
        /// VM name or UUID; all VMs if omitted.
        vm: Option<String>,
    },
    /// Start a stopped VM; returns once it runs.
    VmStart {
        /// VM name or UUID.
        vm: String,
    },
    /// Shut a VM down (ACPI), powering it off after the grace period; returns once stopped.
    VmShutdown {
        /// VM name or UUID.
        vm: String,
        /// Seconds to wait for the guest before powering it off.
        #[arg(long, default_value_t = 60)]
        grace: u32,
    },
    /// Power a VM off at once.
    VmPoweroff {
        /// VM name or UUID.
        vm: String,
    },
    /// Delete a stopped VM and its disks.
    VmDelete {
        /// VM name or UUID.
        vm: String,
    },
    /// Change a stopped VM's mode, vCPUs or memory.
    VmModify {
        /// VM name or UUID.
        vm: String,
        /// New protection mode.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// New vCPUs.
        #[arg(long)]
        cpu: Option<u32>,
        /// New memory, e.g. 1G.
        #[arg(long)]
        memory: Option<String>,
    },
    /// Save a running VM's screen as a PNG (FT VMs have none: see vm-console).
    VmScreenshot {
        /// VM name or UUID.
        vm: String,
        /// The PNG file to write (written whole or not at all).
        file: PathBuf,
    },
    /// Show a VM's serial console.
    VmConsole {
        /// VM name or UUID.
        vm: String,
        /// Keep following new output (until Ctrl-C, or --until matches).
        #[arg(long, short)]
        follow: bool,
        /// Bytes of earlier output to show first.
        #[arg(long, default_value_t = 16384)]
        tail: u64,
        /// Stop (exit 0) once a line containing this text appears.
        #[arg(long)]
        until: Option<String>,
        /// With --until: give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Upload an ISO into the ISO library, on both hosts (streamed and checksummed; a
    /// progress line shows on a terminal; --timeout does not bound the transfer).
    IsoAdd {
        /// The ISO file.
        file: PathBuf,
        /// Its name in the library [default: the file's name].
        #[arg(long)]
        name: Option<String>,
        /// The storage group that keeps it [default: the first group of both hosts].
        #[arg(long)]
        storage_group: Option<String>,
    },
    /// List the ISO library.
    IsoList,
    /// Export a stopped VM, or a snapshot of it, to an OVA archive (OVF descriptor, disks as
    /// stream-optimized VMDKs, SHA-256 manifest); a progress line shows on a terminal;
    /// --timeout does not bound the transfer. FILE is written whole or not at all.
    VmExport {
        /// VM name or UUID.
        vm: String,
        /// Export this snapshot (the VM may then run) instead of the stopped VM's disks.
        #[arg(long)]
        snapshot: Option<String>,
        /// The archive to write, e.g. web.ova (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Create a stopped VM from an OVA archive (as vm-export writes, or another platform's)
    /// or a bare raw, qcow2 or VMDK disk image; a progress line shows on a terminal;
    /// --timeout does not bound the transfer. A refused or broken import leaves nothing.
    VmImport {
        /// The OVA or disk image.
        file: PathBuf,
        /// What FILE is: ova, raw, qcow2 or vmdk [default: by its extension].
        #[arg(long)]
        format: Option<String>,
        /// The VM's name [default: the archive's, or the image's file name].
        #[arg(long)]
        name: Option<String>,
        /// Virtual CPUs [default: the archive's, or 1].
        #[arg(long)]
        cpu: Option<u32>,
        /// Memory, e.g. 512M or 2G [default: the archive's, or 256M].
        #[arg(long)]
        memory: Option<String>,
        /// Protection mode [default: the archive's, or ha].
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// The storage group of its disks [default: sg0].
        #[arg(long)]
        storage_group: Option<String>,
        /// The format of its volumes: raw or qcow2 [default: raw].
        #[arg(long)]
        disk_format: Option<String>,
        /// A business network to attach, replacing the archive's (repeat for more NICs).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// Boot from this kernel image (a bare image needs a boot source).
        #[arg(long, conflicts_with = "iso")]
        kernel_image: Option<String>,
        /// Boot from this ISO of the pair's ISO library.
        #[arg(long)]
        iso: Option<String>,
    },
    /// Delete an ISO from the library (refused while a VM boots from it).
    IsoDelete {
        /// The ISO's name.
        name: String,
    },
    /// Show the pair's events, then follow new ones.
    Events {
        /// Start at this store revision (0: only new events).
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pvctl: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pvctl: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error for a human: a gRPC status shows its message only, anything else its chain.
fn message(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return format!("{} ({:?})", status.message(), status.code());
    }
    format!("{e:#}")
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Cmd::Api(command) => {
            // Login presents the token it is given, not the one in use.
            let token = match &command {
                ApiCmd::Access(access::AccessCmd::Login) => None,
                _ => access::find_token(args.token_file.as_deref())?,
            };
            let endpoint = client::Endpoints {
                list: args.endpoint.unwrap_or_else(lab::Plan::default_endpoints),
                ca: client::find_ca(args.ca),
                token,
            };
            let timeout = Duration::from_secs(args.timeout);
            let token_file = args.token_file.as_deref();
            run_api(command, &endpoint, token_file, args.json, timeout).await
        }
        Cmd::Lab { command } => lab::command::run(command).await,
    }
}

async fn run_api(
    command: ApiCmd,
    endpoint: &client::Endpoints,
    token_file: Option<&std::path::Path>,
    json: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    // Every call has a deadline, so a cron job never hangs on a pair that stopped answering,
    // and is retried within it (same request ID) while the pair elects or loses an etcd member.
    let api = client::Api::new(endpoint, timeout);
    match command {
        ApiCmd::Access(command) => {
            access::run(command, endpoint, token_file, timeout, json).await?;
        }
        ApiCmd::Snapshot(command) => {
            // A snapshot's copy or restore takes as long as the disks need, like an upload.
            let api = client::Api::new(endpoint, timeout.max(snapshots::MIN_TIMEOUT));
            snapshots::run(command, &api, json).await?;
        }
        ApiCmd::NodeInfo => {
            let nodes = api
                .call(pb::ListNodesRequest {}, |mut c, r| async move {
                    c.list_nodes(r).await
                })
                .await?;
            print(json, &nodes_json(&nodes), &nodes_text(&nodes));
        }
        ApiCmd::Alerts { all } => {
            let request = pb::ListAlertsRequest {
                include_cleared: all,
            };
            let alerts = api
                .call(request, |mut c, r| async move { c.list_alerts(r).await })
                .await?
                .alerts;
            print(json, &alerts_json(&alerts), &alerts_text(&alerts));
        }
        ApiCmd::AlertClear { id } => {
            let alert = api
                .call(pb::ClearAlertRequest { id }, |mut c, r| async move {
                    c.clear_alert(r).await
                })
                .await?;
            let text = format!("cleared {} (by {})\n", alert.id, alert.cleared_by);
            print(json, &alerts_json(std::slice::from_ref(&alert))[0], &text);
        }
        ApiCmd::HealthConfig {
            path_timeout_ms,
            lost_confirm_ms,
        } => {
            let mut config = api
                .call(pb::GetHealthConfigRequest {}, |mut c, r| async move {
                    c.get_health_config(r).await
                })
                .await?;
            if path_timeout_ms.is_some() || lost_confirm_ms.is_some() {
                config.path_timeout_ms = path_timeout_ms.unwrap_or(config.path_timeout_ms);
                config.lost_confirm_ms = lost_confirm_ms.unwrap_or(config.lost_confirm_ms);
                config = api
                    .call(
                        config,
                        |mut c, r| async move { c.set_health_config(r).await },
                    )
                    .await?;
            }
            let value = serde_json::json!({
                "path_timeout_ms": config.path_timeout_ms,
                "lost_confirm_ms": config.lost_confirm_ms,
            });
            let text = format!(
                "path_timeout_ms: {}\nlost_confirm_ms: {}\n",
                config.path_timeout_ms, config.lost_confirm_ms
            );
            print(json, &value, &text);
        }
        ApiCmd::VmCreate {
            name,
            mode,
            cpu,
            memory,
            disks,
            networks,
            kernel_image,
            iso,
        } => {
            let request = pb::CreateVmRequest {
                name,
                mode: pb::ProtectionMode::from(mode).into(),
                vcpus: cpu,
                memory_mib: units::parse_mib(&memory)?,
                disks: disks
                    .iter()
                    .map(|d| parse_disk(d))
                    .collect::<anyhow::Result<_>>()?,
                networks,
                boot: match (kernel_image, iso) {
                    (Some(image), _) => Some(pb::create_vm_request::Boot::KernelImage(image)),
                    (None, Some(iso)) => Some(pb::create_vm_request::Boot::Iso(iso)),
                    (None, None) => bail!("give --kernel-image or --iso"),
                },
            };
            let vm = api
                .call(request, |mut c, r| async move { c.create_vm(r).await })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::IsoAdd {
            file,
            name,
            storage_group,
        } => {
            let iso = isos::add(endpoint, &file, name, storage_group).await?;
            print(json, &isos::iso_json(&iso), &isos::iso_text(&iso));
        }
        ApiCmd::VmExport { vm, snapshot, to } => {
            let exported = export::export(endpoint, &vm, snapshot, &to).await?;
            print(
                json,
                &export::exported_json(&exported),
                &export::exported_text(&exported),
            );
        }
        ApiCmd::VmImport {
            file,
            format,
            name,
            cpu,
            memory,
            mode,
            storage_group,
            disk_format,
            networks,
            kernel_image,
            iso,
        } => {
            let overrides = import::Overrides {
                name,
                mode: mode.map(pb::ProtectionMode::from),
                vcpus: cpu,
                memory_mib: memory.as_deref().map(units::parse_mib).transpose()?,
                storage_group,
                disk_format: match disk_format.as_deref() {
                    None => None,
                    Some("raw") => Some(pb::DiskFormat::Raw),
                    Some("qcow2") => Some(pb::DiskFormat::Qcow2),
                    Some(other) => bail!("unknown disk format {other:?}; use raw or qcow2"),
                },
                networks,
                boot: match (kernel_image, iso) {
                    (Some(image), _) => Some(pb::import_vm_header::Boot::KernelImage(image)),
                    (None, Some(iso)) => Some(pb::import_vm_header::Boot::Iso(iso)),
                    (None, None) => None,
                },
            };
            let format = format.as_deref().map(import::format_named).transpose()?;
            let vm = import::import(endpoint, &file, format, overrides).await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::IsoList => {
            let list = api
                .call(pb::ListIsosRequest {}, |mut c, r| async move {
                    c.list_isos(r).await
                })
                .await?
                .isos;
            let value = serde_json::Value::Array(list.iter().map(isos::iso_json).collect());
            print(json, &value, &isos::isos_table(&list));
        }
        ApiCmd::IsoDelete { name } => {
            api.call(
                pb::DeleteIsoRequest { name: name.clone() },
                |mut c, r| async move { c.delete_iso(r).await },
            )
            .await?;
            let value = serde_json::json!({ "deleted": name });
            print(json, &value, &format!("deleted ISO {name}\n"));
        }
        ApiCmd::VmInfo { vm: Some(vm) } => {
            let vm = api
                .call(pb::GetVmRequest { vm }, |mut c, r| async move {
                    c.get_vm(r).await
                })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::VmInfo { vm: None } => {
            let vms = api
                .call(pb::ListVmsRequest {}, |mut c, r| async move {
                    c.list_vms(r).await
                })
                .await?
                .vms;
            let value = serde_json::Value::Array(vms.iter().map(vm_json).collect());
            print(json, &value, &vms_table(&vms));
        }
        ApiCmd::VmStart { vm } => {
            let vm = api
                .call(pb::StartVmRequest { vm }, |mut c, r| async move {
                    c.start_vm(r).await
                })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::VmShutdown { vm, grace } => {
            let request = pb::ShutdownVmRequest {
                vm,
                grace_seconds: grace,
            };
            let api = client::Api::new(endpoint, timeout + Duration::from_secs(u64::from(grace)));
            let vm = api
                .call(request, |mut c, r| async move { c.shutdown_vm(r).await })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::VmPoweroff { vm } => {
            let vm = api
                .call(pb::PowerOffVmRequest { vm }, |mut c, r| async move {
                    c.power_off_vm(r).await
                })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::VmDelete { vm } => {
            let request = pb::DeleteVmRequest { vm: vm.clone() };
            let deleted = api
                .call(request, |mut c, r| async move { c.delete_vm(r).await })
                .await?;
            let value = serde_json::json!({ "deleted": vm, "uuid": deleted.uuid });
            print(
                json,
                &value,
                &format!("deleted VM {vm} ({})\n", deleted.uuid),
            );
        }
        ApiCmd::VmModify {
            vm,
            mode,
            cpu,
            memory,
        } => {
            let request = pb::ModifyVmRequest {
                vm,
                mode: mode.map(|m| pb::ProtectionMode::from(m).into()),
                vcpus: cpu,
                memory_mib: memory.as_deref().map(units::parse_mib).transpose()?,
            };
            let vm = api
                .call(request, |mut c, r| async move { c.modify_vm(r).await })
                .await?;
            print(json, &vm_json(&vm), &vm_text(&vm));
        }
        ApiCmd::VmScreenshot { vm, file } => {
            let shot = api
                .call(pb::ScreenshotVmRequest { vm }, |mut c, r| async move {
                    c.screenshot_vm(r).await
                })
                .await?;
            files::write_file(&file, &shot.png, 0o644)?;
            let value = serde_json::json!({ "file": file, "bytes": shot.png.len() });
            let text = format!("{} ({} bytes)\n", file.display(), shot.png.len());
            print(json, &value, &text);
        }
        ApiCmd::VmConsole {
            vm,
            follow,
            tail,
            until,
            timeout,
        } => {
            let request = pb::StreamConsoleRequest {
                vm,
                tail_bytes: tail,
                follow: follow || until.is_some(),
            };
            let mut client = client::connect(endpoint).await?;
            let stream = client.stream_console(request).await?.into_inner();
            let watch = console(stream, json, until.as_deref());
            match &until {
                Some(text) => tokio::time::timeout(std::time::Duration::from_secs(timeout), watch)
                    .await
                    .with_context(|| {
                        format!("{text:?} did not appear on the console within {timeout} s")
                    })??,
                None => watch.await?,
            }
        }
        ApiCmd::Events { since, count } => {
            let mut client = client::connect(endpoint).await?;
            let mut stream = client
                .watch_events(pb::WatchEventsRequest {
                    since_revision: since,
                })
                .await?
                .into_inner();
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                let Some(event) = stream.next().await else {
                    break;
                };
                let event = event?;
                print(
                    json,
                    &event_json(&event),
                    &format!("{}\n", event_text(&event)),
                );
                seen += 1;
            }
        }
    }
    Ok(())
}

/// Prints console output; with `until`, returns once a line contains it.
async fn console(
    mut stream: tonic::Streaming<pb::ConsoleChunk>,
    json: bool,
    until: Option<&str>,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    let mut line = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if json {
            let text = String::from_utf8_lossy(&chunk.data);
            println!(
                "{}",
                serde_json::json!({ "offset": chunk.offset, "data": text })
            );
        } else {
            stdout.write_all(&chunk.data)?;
            stdout.flush()?;
        }
        for &byte in &chunk.data {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            if until.is_some_and(|u| String::from_utf8_lossy(&line).contains(u)) {
                return Ok(());
            }
            line.clear();
        }
    }
    match until {
        Some(text) => bail!("the console ended before {text:?} appeared"),
        None => Ok(()),
    }
}

/// Parses `SIZE[:STORAGE_GROUP[:FORMAT]]`.
fn parse_disk(text: &str) -> anyhow::Result<pb::DiskRequest> {
    let mut parts = text.split(':');
    let size = parts.next().unwrap_or_default();
    let group = parts.next().filter(|g| !g.is_empty()).unwrap_or("sg0");
    let format = match parts.next() {
        None | Some("raw") => pb::DiskFormat::Raw,
        Some("qcow2") => pb::DiskFormat::Qcow2,
        Some(other) => bail!("disk {text:?}: unknown format {other:?}; use raw or qcow2"),
    };
    if parts.next().is_some() {
        bail!("disk {text:?}: expected SIZE[:STORAGE_GROUP[:raw|qcow2]]");
    }
    Ok(pb::DiskRequest {
        size_bytes: units::parse_bytes(size)?,
        storage_group: group.to_string(),
        format: format.into(),
    })
}

/// `message` as a request that fails after `timeout`.
fn print(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        print!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_disk_size_only_uses_sg0_raw() {
        let disk = parse_disk("16M").unwrap();

        assert_eq!(
            disk,
            pb::DiskRequest {
                size_bytes: 16 << 20,
                storage_group: "sg0".into(),
                format: pb::DiskFormat::Raw.into(),
            }
        );
    }

    #[test]
    fn parse_disk_with_group_and_qcow2() {
        let disk = parse_disk("1G:fast:qcow2").unwrap();

        assert_eq!(disk.storage_group, "fast");
        assert_eq!(disk.format(), pb::DiskFormat::Qcow2);
    }

    #[test]
    fn parse_disk_unknown_format_is_refused() {
        let err = parse_disk("1G:sg0:vmdk").unwrap_err();

        assert!(err.to_string().contains("unknown format"));
    }
}
