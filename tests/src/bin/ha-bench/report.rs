//! The report: the numbers with their targets, as a table or one JSON object.

use serde_json::{Value, json};

use crate::failover::Failover;
use crate::latency::{Classified, Cycle, Resync};
use crate::stats::{median, median_u64, tenth};

/// Target of the issue: a mirrored write costs at most 1.3 times a local one.
const WRITE_RATIO_TARGET: f64 = 1.3;
/// Target of the issue: a dead host is detected within 2 s.
const DETECT_TARGET_MS: f64 = 2000.0;

/// Everything measured.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) classified: Classified,
    pub(crate) cycles: Vec<Cycle>,
    pub(crate) failover: Failover,
    /// The first sync after the VM started.
    pub(crate) first_sync: Resync,
    /// The mirror back to the restored host after the failover.
    pub(crate) restore: Resync,
    pub(crate) lab_up_s: f64,
    pub(crate) run_s: f64,
}

/// A number for the JSON: rounded to 0.1, null when unknown.
fn num(x: Option<f64>) -> Value {
    x.filter(|x| x.is_finite())
        .map_or(Value::Null, |x| json!(tenth(x)))
}

/// A number for the table: `digits` decimals, "-" when unknown.
fn text(x: Option<f64>, digits: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

impl Report {
    fn local_us(&self) -> Option<f64> {
        median(&self.classified.local)
    }

    fn mirrored_us(&self) -> Option<f64> {
        median(&self.classified.mirrored)
    }

    fn ratio(&self) -> Option<f64> {
        Some(self.mirrored_us()? / self.local_us()?)
    }

    /// Every rebuild of the mirror, in order.
    fn resyncs(&self) -> Vec<&Resync> {
        let outages = self.cycles.iter().map(|c| &c.resync);
        std::iter::once(&self.first_sync)
            .chain(outages)
            .chain(std::iter::once(&self.restore))
            .collect()
    }

    fn resync_mbps(&self) -> Option<f64> {
        let timed: Vec<f64> = self.resyncs().iter().filter_map(|r| r.mbps()).collect();
        median(&timed)
    }

    /// Medians over the cycles: bytes the rebuild copied, bytes the guest wrote.
    fn outage_bytes(&self) -> (Option<u64>, Option<u64>) {
        let copied: Vec<u64> = self.cycles.iter().map(|c| c.resync.bytes).collect();
        let written: Vec<u64> = self.cycles.iter().map(|c| c.guest_bytes).collect();
        (median_u64(&copied), median_u64(&written))
    }

    /// Bytes the rebuild after an outage copied per byte the guest wrote in it.
    fn outage_ratio(&self) -> Option<f64> {
        match self.outage_bytes() {
            (Some(copied), Some(written)) if written > 0 => Some(copied as f64 / written as f64),
            _ => None,
        }
    }

    /// Whether each metric with a target meets it (unknown: not met).
    fn met(&self) -> [(&'static str, bool); 2] {
        [
            (
                "write_latency_ratio",
                self.ratio().is_some_and(|r| r <= WRITE_RATIO_TARGET),
            ),
            (
                "failover_detect_ms",
                self.failover
                    .detect_ms
                    .is_some_and(|ms| ms <= DETECT_TARGET_MS),
            ),
        ]
    }

    pub(crate) fn json(&self) -> Value {
        let f = &self.failover;
        let (copied, written) = self.outage_bytes();
        let met: serde_json::Map<String, Value> = self
            .met()
            .into_iter()
            .map(|(name, met)| (name.to_string(), json!(met)))
            .collect();
        json!({
            "write_latency_local_us": num(self.local_us()),
            "write_latency_mirrored_us": num(self.mirrored_us()),
            "write_latency_ratio": self.ratio().map(|r| (r * 100.0).round() / 100.0),
            "failover_detect_ms": num(f.detect_ms),
            "failover_fence_ms": num(f.fence_ms),
            "failover_start_ms": num(f.start_ms),
            "failover_first_counter_ms": num(f.first_counter_ms),
            "resync_mbps": num(self.resync_mbps()),
            "resync_bytes_after_10s_outage": copied,
            "guest_bytes_written_in_10s_outage": written,
            "resync_bytes_per_written_byte": num(self.outage_ratio()),
            "write_latency": {
                "writes_per_round": 200,
                "local_rounds_us": self.classified.local,
                "mirrored_rounds_us": self.classified.mirrored,
                "unclassified_rounds": self.classified.other,
            },
            "failover": {
                "victim": f.victim,
                "survivor": f.survivor,
                "victim_served": f.victim_served,
                "etcd_leader": f.etcd_leader,
                "detect_by": f.detect_by,
                "fence_outcome": f.fence_outcome,
                "kill_command_ms": num(Some(f.kill_command_ms)),
                "decided_ms": num(f.decided_ms),
                "running_ms": num(f.running_ms),
                "last_counter_before": f.last_counter,
                "first_counter_after": f.first_counter,
            },
            "outages": self.cycles.iter().map(outage_json).collect::<Vec<_>>(),
            "resyncs": self.resyncs().into_iter().map(resync_json).collect::<Vec<_>>(),
            "targets": {
                "write_latency_ratio": WRITE_RATIO_TARGET,
                "failover_detect_ms": DETECT_TARGET_MS,
            },
            "targets_met": met,
            "lab_up_s": tenth(self.lab_up_s),
            "run_s": tenth(self.run_s),
        })
    }

    pub(crate) fn print_table(&self) {
        let met = self.met();
        let yes = |i: usize| if met[i].1 { "yes" } else { "NO" };
        let c = &self.classified;
        let f = &self.failover;
        let (copied, written) = self.outage_bytes();
        let timed = self.resyncs().iter().filter(|r| r.mbps().is_some()).count();
        let rows = [
            (
                "write_latency_local_us",
                format!("{} ({} rounds)", text(self.local_us(), 1), c.local.len()),
                "",
                "",
            ),
            (
                "write_latency_mirrored_us",
                format!(
                    "{} ({} rounds)",
                    text(self.mirrored_us(), 1),
                    c.mirrored.len()
                ),
                "",
                "",
            ),
            (
                "write_latency_ratio",
                format!("{} (mirrored / local)", text(self.ratio(), 2)),
                "<= 1.3",
                yes(0),
            ),
            (
                "failover_detect_ms",
                format!("{} ({})", text(f.detect_ms, 0), f.detect_by),
                "<= 2000",
                yes(1),
            ),
            (
                "failover_fence_ms",
                format!(
                    "{} ({})",
                    text(f.fence_ms, 0),
                    f.fence_outcome.as_deref().unwrap_or("no fence logged")
                ),
                "",
                "",
            ),
            ("failover_start_ms", text(f.start_ms, 0), "", ""),
            (
                "failover_first_counter_ms",
                text(f.first_counter_ms, 0),
                "",
                "",
            ),
            (
                "resync_mbps",
                format!("{} (median of {timed} copies)", text(self.resync_mbps(), 1)),
                "",
                "",
            ),
            (
                "resync_bytes_after_10s_outage",
                format!(
                    "{} (guest wrote {}; {}x)",
                    copied.map_or("-".into(), |b| b.to_string()),
                    written.map_or("-".into(), |b| b.to_string()),
                    text(self.outage_ratio(), 1)
                ),
                "",
                "",
            ),
        ];
        let width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
        println!(
            "{:<30}  {:<width$}  {:<8}  met",
            "metric", "value", "target"
        );
        for (name, value, target, met) in rows {
            println!("{name:<30}  {value:<width$}  {target:<8}  {met}");
        }
        println!(
            "failover {} ({}serving, etcd leader {}) -> {} (kill-host took {:.0} ms; counter {} printed before, {} first after); {} unclassified rounds; lab up {:.0} s, whole run {:.0} s",
            f.victim,
            if f.victim_served { "" } else { "not " },
            f.etcd_leader,
            f.survivor,
            f.kill_command_ms,
            f.last_counter.map_or("-".into(), |n| n.to_string()),
            f.first_counter.map_or("-".into(), |n| n.to_string()),
            c.other,
            self.lab_up_s,
            self.run_s
        );
    }
}

fn outage_json(c: &Cycle) -> Value {
    json!({
        "simplex_after_ms": num(c.simplex_after_ms),
        "guest_bytes_written": c.guest_bytes,
        "resync_bytes": c.resync.bytes,
        "resync_bytes_source": c.resync.bytes_source,
    })
}

fn resync_json(r: &Resync) -> Value {
    json!({
        "trigger": r.trigger,
        "bytes": r.bytes,
        "bytes_source": r.bytes_source,
        "copy_ms": num(r.copy_ms),
        "to_protected_ms": num(Some(r.to_protected_ms)),
        "mbps": num(r.mbps()),
    })
}
