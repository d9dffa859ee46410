//! Network output commit: the frames an FT guest sends are held in QEMU until the epoch that
//! produced them commits. Each NIC of an FT domain gets a `filter-buffer` on the guest's side
//! of its netdev (`queue=rx`: what the netdev receives from the guest), created off; the epoch
//! loop turns it on for as long as it checkpoints. At each commit, while the guest is still
//! stopped, switching the filter off and on again flushes exactly that epoch's frames to the
//! network (QEMU flushes a filter-buffer when it is switched off) and holds the next epoch's.
//! The filter's own release timer runs on the guest's virtual clock and is re-armed at every
//! switch, so with an interval of ~71 min it never fires while epochs run. Frames from the network
//! reach the guest unbuffered, as in Remus: they are input, and a lost input is a lost packet.
//! A failover drops the held frames with the primary's QEMU; the peer's TCP retransmits.

use serde_json::{Value, json};

use super::qmp::{self, Qmp};

/// Prefix of the filters' QOM ids: `ft-net0` guards the first NIC.
const FILTER_PREFIX: &str = "ft-net";
/// The filters' own release interval (µs of guest time): the largest QEMU takes, ~71 min.
const INTERVAL_US: u32 = u32::MAX;

/// The QOM id of the filter guarding NIC `index`.
pub fn filter_id(index: usize) -> String {
    format!("{FILTER_PREFIX}{index}")
}

/// The `-object` argument that creates NIC `index`'s filter on netdev `netdev`, switched off
/// (a guest that is not checkpointed sends freely).
pub fn filter_object(index: usize, netdev: &str) -> String {
    format!(
        "filter-buffer,id={},netdev={netdev},queue=rx,interval={INTERVAL_US},status=off",
        filter_id(index)
    )
}

/// The net filters of one FT domain, as the epoch loop drives them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetBuffers {
    filters: Vec<String>,
}

impl NetBuffers {
    /// Finds the domain's filters among QEMU's user-created objects.
    pub async fn discover(qmp: &mut Qmp) -> Result<NetBuffers, qmp::Error> {
        let objects = qmp
            .execute("qom-list", json!({ "path": "/objects" }))
            .await?;
        Ok(NetBuffers {
            filters: filter_names(&objects),
        })
    }

    /// How many NICs the guest has (virtio ones: those QEMU answers `query-rx-filter` for,
    /// the only model FT domains get).
    pub async fn guest_nics(qmp: &mut Qmp) -> Result<usize, qmp::Error> {
        let nics = qmp.execute("query-rx-filter", Value::Null).await?;
        Ok(nics.as_array().map_or(0, Vec::len))
    }

    /// How many NICs are guarded.
    pub fn len(&self) -> usize {
        self.filters.len()
    }

    /// Whether the domain has no guarded NIC.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Starts holding the guest's frames.
    pub async fn hold(&self, qmp: &mut Qmp) -> Result<(), qmp::Error> {
        self.set(qmp, "on").await
    }

    /// Sends the frames held so far (the guest must be stopped, so that they are all of the
    /// committed epoch) and holds those that follow.
    pub async fn release(&self, qmp: &mut Qmp) -> Result<(), qmp::Error> {
        self.set(qmp, "off").await?;
        self.set(qmp, "on").await
    }

    /// Sends the frames held so far and stops holding: the guest is not checkpointed any more.
    pub async fn open(&self, qmp: &mut Qmp) -> Result<(), qmp::Error> {
        self.set(qmp, "off").await
    }

    async fn set(&self, qmp: &mut Qmp, status: &str) -> Result<(), qmp::Error> {
        for filter in &self.filters {
            let path = format!("/objects/{filter}");
            qmp.execute(
                "qom-set",
                json!({ "path": path, "property": "status", "value": status }),
            )
            .await?;
        }
        Ok(())
    }
}

/// Our filters in a `qom-list` answer: `[{"name": "ft-net0", "type": "child<filter-buffer>"}, …]`.
fn filter_names(objects: &Value) -> Vec<String> {
    let mut names: Vec<String> = objects
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["type"] == "child<filter-buffer>")
        .filter_map(|o| o["name"].as_str())
        .filter(|name| name.starts_with(FILTER_PREFIX))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_keeps_our_buffers_only() {
        let objects = json!([
            { "name": "ft-net1", "type": "child<filter-buffer>" },
            { "name": "ft-net0", "type": "child<filter-buffer>" },
            { "name": "other", "type": "child<filter-buffer>" },
            { "name": "ft-net9", "type": "child<memory-backend-file>" },
            { "name": "pc.ram", "type": "child<memory-backend-file>" }
        ]);

        assert_eq!(filter_names(&objects), vec!["ft-net0", "ft-net1"]);
        assert!(filter_names(&json!({ "error": "x" })).is_empty());
    }

    #[test]
    fn filter_object_is_off_on_the_guests_side() {
        assert_eq!(
            filter_object(0, "hostua-net0"),
            "filter-buffer,id=ft-net0,netdev=hostua-net0,queue=rx,interval=4294967295,status=off"
        );
    }
}
