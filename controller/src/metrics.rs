//! Prometheus metrics of a controller (`GET /metrics`, text format 0.0.4): its API calls'
//! counts and latencies (measured by the token guard), the pair's status, and, on the
//! serving controller, the hosts, heartbeat paths, alerts and VMs as the API shows them
//! (the same figures as `ListNodes` and `GetVm`: one set of semantics). FT figures are the
//! controller's view of the primary's reports: the last checkpoint pause, epochs per second
//! and the committed epoch, which moves while an FT VM is protected.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use proto::v1 as pb;

use crate::as_f64;
use crate::status::Level;

/// Upper bounds (seconds) of the API latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// One method's latency histogram.
#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Calls per bucket (not cumulative), and past the last.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += seconds;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What the API port has served.
#[derive(Debug, Default)]
struct Calls {
    /// Calls by (method, gRPC code name).
    by_code: BTreeMap<(String, String), u64>,
    /// Latency by method.
    latency: BTreeMap<String, Histogram>,
}

/// A controller's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<Calls>,
}

/// What the serving controller knows of the pair, as the API shows it.
#[derive(Clone, Debug, Default)]
pub struct PairView {
    /// Every VM.
    pub vms: Vec<pb::Vm>,
    /// The hosts.
    pub nodes: Vec<pb::Node>,
    /// Open alerts.
    pub alerts: usize,
}

impl Metrics {
    /// Records an API call of `method` that ended with `code` after `seconds` (for a
    /// stream: until it began).
    pub fn observe_call(&self, method: &str, code: &str, seconds: f64) {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *calls
            .by_code
            .entry((method.to_string(), code.to_string()))
            .or_default() += 1;
        calls
            .latency
            .entry(method.to_string())
            .or_default()
            .observe(seconds);
    }

    /// The metrics in Prometheus' text format: this controller's, with the pair's `status`
    /// and, if this controller serves, `pair`.
    pub fn render(&self, node: &str, status: Level, pair: Option<&PairView>) -> String {
        let mut out = Out::default();
        let node_label = [("node", node)];
        out.family(
            "pairvisor_controller_serving",
            "gauge",
            "Whether this controller serves the pair.",
        );
        out.sample(
            "pairvisor_controller_serving",
            &node_label,
            f64::from(u8::from(pair.is_some())),
        );
        out.family(
            "pairvisor_pair_status",
            "gauge",
            "The pair's status (what /health says): 1 for the current one.",
        );
        for level in [Level::Ok, Level::Warning, Level::Failed] {
            let value = f64::from(u8::from(level == status));
            out.sample("pairvisor_pair_status", &[("status", level.word())], value);
        }
        self.render_calls(&mut out);
        if let Some(pair) = pair {
            render_pair(&mut out, pair);
        }
        out.text
    }

    fn render_calls(&self, out: &mut Out) {
        let calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.family(
            "pairvisor_api_requests_total",
            "counter",
            "Public API calls by method and gRPC code.",
        );
        for ((method, code), count) in &calls.by_code {
            let labels = [("method", method.as_str()), ("code", code.as_str())];
            out.sample("pairvisor_api_requests_total", &labels, as_f64(*count));
        }
        out.family(
            "pairvisor_api_request_duration_seconds",
            "histogram",
            "Public API call latency (a stream: until it began).",
        );
        for (method, histogram) in &calls.latency {
            let mut cumulative = 0u64;
            for (bound, count) in BUCKETS.iter().zip(histogram.counts) {
                cumulative += count;
                let le = bound.to_string();
                let labels = [("method", method.as_str()), ("le", le.as_str())];
                out.sample(
                    "pairvisor_api_request_duration_seconds_bucket",
                    &labels,
                    as_f64(cumulative),
                );
            }
            let labels = [("method", method.as_str()), ("le", "+Inf")];
            out.sample(
                "pairvisor_api_request_duration_seconds_bucket",
                &labels,
                as_f64(histogram.count()),
            );
            let labels = [("method", method.as_str())];
            out.sample(
                "pairvisor_api_request_duration_seconds_sum",
                &labels,
                histogram.sum,
            );
            out.sample(
                "pairvisor_api_request_duration_seconds_count",
                &labels,
                as_f64(histogram.count()),
            );
        }
    }
}

/// The serving controller's figures of the pair.
fn render_pair(out: &mut Out, pair: &PairView) {
    out.family("pairvisor_alerts_open", "gauge", "Open alerts.");
    out.sample("pairvisor_alerts_open", &[], as_f64(pair.alerts as u64));
    out.family(
        "pairvisor_node_up",
        "gauge",
        "Whether the host is up (not suspect, lost or fenced).",
    );
    for node in &pair.nodes {
        let up = node.state() == pb::NodeState::Up;
        out.sample(
            "pairvisor_node_up",
            &[("node", &node.name)],
            f64::from(u8::from(up)),
        );
    }
    out.family(
        "pairvisor_heartbeat_path_up",
        "gauge",
        "Whether a heartbeat path to the host is heard.",
    );
    for node in &pair.nodes {
        for path in &node.paths {
            let labels = [("node", node.name.as_str()), ("path", path.name.as_str())];
            out.sample(
                "pairvisor_heartbeat_path_up",
                &labels,
                f64::from(u8::from(path.up)),
            );
        }
    }
    alinks(out, &pair.nodes);
    out.family("pairvisor_vm_running", "gauge", "Whether the VM runs.");
    for vm in &pair.vms {
        let running = vm.state() == pb::VmState::Running;
        out.sample(
            "pairvisor_vm_running",
            &[("vm", &vm.name)],
            f64::from(u8::from(running)),
        );
    }
    vm_protection(out, &pair.vms);
    vm_ft(out, &pair.vms);
}

/// Each host's side of each A-Link: counters since its agent started.
fn alinks(out: &mut Out, nodes: &[pb::Node]) {
    out.family(
        "pairvisor_alink_up",
        "gauge",
        "Whether the A-Link is up, as the host's replicator sees it.",
    );
    out.family(
        "pairvisor_alink_sent_bytes_total",
        "counter",
        "Bytes the host sent on the A-Link.",
    );
    out.family(
        "pairvisor_alink_received_bytes_total",
        "counter",
        "Bytes the host received on the A-Link.",
    );
    out.family(
        "pairvisor_alink_retransmits_total",
        "counter",
        "Frames first sent on the A-Link and resent on the other after it failed.",
    );
    out.family(
        "pairvisor_alink_rtt_seconds",
        "gauge",
        "The A-Link's last keepalive round trip.",
    );
    for node in nodes {
        for link in &node.alinks {
            let labels = [("node", node.name.as_str()), ("link", link.name.as_str())];
            out.sample("pairvisor_alink_up", &labels, f64::from(u8::from(link.up)));
            out.sample(
                "pairvisor_alink_sent_bytes_total",
                &labels,
                as_f64(link.bytes_sent),
            );
            out.sample(
                "pairvisor_alink_received_bytes_total",
                &labels,
                as_f64(link.bytes_received),
            );
            out.sample(
                "pairvisor_alink_retransmits_total",
                &labels,
                as_f64(link.retransmits),
            );
            if let Some(rtt) = link.rtt_us {
                out.sample("pairvisor_alink_rtt_seconds", &labels, as_f64(rtt) / 1e6);
            }
        }
    }
}

fn vm_protection(out: &mut Out, vms: &[pb::Vm]) {
    out.family(
        "pairvisor_vm_protected",
        "gauge",
        "Whether an HA or FT VM's disks are on both hosts (protection state 'protected').",
    );
    out.family(
        "pairvisor_vm_sync_done_bytes",
        "gauge",
        "Bytes of the initial copy done.",
    );
    out.family(
        "pairvisor_vm_sync_total_bytes",
        "gauge",
        "Bytes of the initial copy to do.",
    );
    out.family(
        "pairvisor_mirror_writes_total",
        "counter",
        "Writes to each mirrored disk since its QEMU started; each completes only once on both hosts.",
    );
    out.family(
        "pairvisor_mirror_write_seconds_total",
        "counter",
        "Their total time: rate(this) / rate(pairvisor_mirror_writes_total) is the mirror's write latency.",
    );
    for vm in vms {
        let Some(protection) = &vm.protection else {
            continue;
        };
        let labels = [("vm", vm.name.as_str())];
        let protected = protection.state == "protected";
        out.sample(
            "pairvisor_vm_protected",
            &labels,
            f64::from(u8::from(protected)),
        );
        out.sample(
            "pairvisor_vm_sync_done_bytes",
            &labels,
            as_f64(protection.sync_done_bytes),
        );
        out.sample(
            "pairvisor_vm_sync_total_bytes",
            &labels,
            as_f64(protection.sync_total_bytes),
        );
        for disk in &protection.disk_writes {
            let labels = [("vm", vm.name.as_str()), ("disk", disk.device.as_str())];
            out.sample("pairvisor_mirror_writes_total", &labels, as_f64(disk.count));
            out.sample(
                "pairvisor_mirror_write_seconds_total",
                &labels,
                disk.total_seconds,
            );
        }
    }
}

fn vm_ft(out: &mut Out, vms: &[pb::Vm]) {
    out.family(
        "pairvisor_ft_committed_epoch",
        "gauge",
        "The last checkpoint committed on the FT VM's standby (0: none in this run).",
    );
    out.family(
        "pairvisor_ft_epochs_per_second",
        "gauge",
        "Checkpoints committed per second, between the controller's last two looks.",
    );
    out.family(
        "pairvisor_ft_last_pause_seconds",
        "gauge",
        "The last checkpoint's pause of the guest.",
    );
    out.family(
        "pairvisor_ft_checkpoint_pause_seconds",
        "histogram",
        "Every checkpoint's pause of the guest in the FT VM's current run.",
    );
    out.family(
        "pairvisor_ft_epoch_length_seconds",
        "histogram",
        "Every epoch's length, commit to commit, in the FT VM's current run: how far the standby can be behind.",
    );
    for vm in vms {
        let Some(ft) = &vm.ft else {
            continue;
        };
        let labels = [("vm", vm.name.as_str())];
        out.sample(
            "pairvisor_ft_committed_epoch",
            &labels,
            as_f64(ft.committed_epoch),
        );
        if let Some(rate) = ft.epochs_per_second {
            out.sample("pairvisor_ft_epochs_per_second", &labels, rate);
        }
        if let Some(pause) = ft.last_pause_ms {
            out.sample("pairvisor_ft_last_pause_seconds", &labels, pause / 1000.0);
        }
        histogram(
            out,
            "pairvisor_ft_checkpoint_pause_seconds",
            &vm.name,
            &ft.pause_histogram,
            ft.pause_count,
            ft.pause_sum_ms,
        );
        histogram(
            out,
            "pairvisor_ft_epoch_length_seconds",
            &vm.name,
            &ft.epoch_histogram,
            ft.epoch_count,
            ft.epoch_sum_ms,
        );
    }
}

/// A histogram of `ft` in milliseconds as the Prometheus histogram `name` in seconds (none
/// before its run reported any).
fn histogram(
    out: &mut Out,
    name: &str,
    vm: &str,
    buckets: &[pb::DurationBucket],
    count: u64,
    sum_ms: f64,
) {
    if buckets.is_empty() {
        return;
    }
    for bucket in buckets {
        let le = number(bucket.le_ms / 1000.0);
        out.sample(
            &format!("{name}_bucket"),
            &[("vm", vm), ("le", &le)],
            as_f64(bucket.count),
        );
    }
    let labels = [("vm", vm)];
    out.sample(
        &format!("{name}_bucket"),
        &[("vm", vm), ("le", "+Inf")],
        as_f64(count),
    );
    out.sample(&format!("{name}_sum"), &labels, sum_ms / 1000.0);
    out.sample(&format!("{name}_count"), &labels, as_f64(count));
}

/// Text being written.
#[derive(Debug, Default)]
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
                .collect();
            let _ = write!(self.text, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// A label value escaped as the text format wants.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let metrics = Metrics::default();
        metrics.observe_call("ListVms", "Ok", 0.002);
        metrics.observe_call("ListVms", "Ok", 0.2);
        metrics.observe_call("ListVms", "Unavailable", 40.0);

        let text = metrics.render("n0", Level::Ok, None);

        assert!(text.contains("pairvisor_api_request_duration_seconds_bucket{method=\"ListVms\",le=\"0.0025\"} 1\n"), "{text}");
        assert!(text.contains(
            "pairvisor_api_request_duration_seconds_bucket{method=\"ListVms\",le=\"0.25\"} 2\n"
        ));
        assert!(text.contains(
            "pairvisor_api_request_duration_seconds_bucket{method=\"ListVms\",le=\"+Inf\"} 3\n"
        ));
        assert!(
            text.contains(
                "pairvisor_api_requests_total{method=\"ListVms\",code=\"Unavailable\"} 1\n"
            )
        );
        assert!(text.contains("pairvisor_controller_serving{node=\"n0\"} 0\n"));
        assert!(text.contains("pairvisor_pair_status{status=\"OK\"} 1\n"));
    }

    #[test]
    fn serving_view_shows_ft_figures_and_escapes_names() {
        let vm = pb::Vm {
            name: "we\"b".into(),
            state: pb::VmState::Running.into(),
            ft: Some(pb::FtInfo {
                committed_epoch: 42,
                last_pause_ms: Some(12.5),
                pause_histogram: vec![
                    pb::DurationBucket {
                        le_ms: 10.0,
                        count: 3,
                    },
                    pb::DurationBucket {
                        le_ms: 20.0,
                        count: 5,
                    },
                ],
                pause_count: 6,
                pause_sum_ms: 75.0,
                epoch_histogram: vec![pb::DurationBucket {
                    le_ms: 200.0,
                    count: 4,
                }],
                epoch_count: 5,
                epoch_sum_ms: 900.0,
                ..pb::FtInfo::default()
            }),
            protection: Some(pb::Protection {
                state: "protected".into(),
                disk_writes: vec![pb::DiskWrites {
                    device: "vda".into(),
                    count: 40,
                    total_seconds: 0.5,
                }],
                ..pb::Protection::default()
            }),
            ..pb::Vm::default()
        };
        let node = pb::Node {
            name: "n0".into(),
            alinks: vec![pb::Alink {
                name: "alink1".into(),
                up: true,
                bytes_sent: 4096,
                rtt_us: Some(250),
                ..pb::Alink::default()
            }],
            ..pb::Node::default()
        };
        let pair = PairView {
            vms: vec![vm],
            nodes: vec![node],
            alerts: 2,
        };

        let text = Metrics::default().render("n1", Level::Warning, Some(&pair));

        assert!(
            text.contains("pairvisor_ft_committed_epoch{vm=\"we\\\"b\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("pairvisor_ft_last_pause_seconds{vm=\"we\\\"b\"} 0.0125\n"));
        for line in [
            "pairvisor_ft_checkpoint_pause_seconds_bucket{vm=\"we\\\"b\",le=\"0.01\"} 3\n",
            "pairvisor_ft_checkpoint_pause_seconds_bucket{vm=\"we\\\"b\",le=\"0.02\"} 5\n",
            "pairvisor_ft_checkpoint_pause_seconds_bucket{vm=\"we\\\"b\",le=\"+Inf\"} 6\n",
            "pairvisor_ft_checkpoint_pause_seconds_sum{vm=\"we\\\"b\"} 0.075\n",
            "pairvisor_ft_checkpoint_pause_seconds_count{vm=\"we\\\"b\"} 6\n",
            "pairvisor_ft_epoch_length_seconds_bucket{vm=\"we\\\"b\",le=\"0.2\"} 4\n",
            "pairvisor_ft_epoch_length_seconds_bucket{vm=\"we\\\"b\",le=\"+Inf\"} 5\n",
            "pairvisor_ft_epoch_length_seconds_sum{vm=\"we\\\"b\"} 0.9\n",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        assert!(text.contains("pairvisor_vm_running{vm=\"we\\\"b\"} 1\n"));
        assert!(text.contains("pairvisor_vm_protected{vm=\"we\\\"b\"} 1\n"));
        assert!(text.contains("pairvisor_mirror_writes_total{vm=\"we\\\"b\",disk=\"vda\"} 40\n"));
        assert!(
            text.contains(
                "pairvisor_mirror_write_seconds_total{vm=\"we\\\"b\",disk=\"vda\"} 0.5\n"
            )
        );
        assert!(text.contains("pairvisor_alerts_open 2\n"));
        assert!(
            text.contains("pairvisor_alink_sent_bytes_total{node=\"n0\",link=\"alink1\"} 4096\n")
        );
        assert!(
            text.contains("pairvisor_alink_rtt_seconds{node=\"n0\",link=\"alink1\"} 0.00025\n")
        );
        assert!(text.contains("pairvisor_controller_serving{node=\"n1\"} 1\n"));
    }

    #[test]
    fn every_sample_belongs_to_a_declared_family() {
        let metrics = Metrics::default();
        metrics.observe_call("CreateVm", "Ok", 0.01);
        let text = metrics.render("n0", Level::Failed, Some(&PairView::default()));
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();

        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| declared.contains(f))
                .unwrap_or(name);
            assert!(declared.contains(&family), "{name} has no TYPE line");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        }
    }
}
