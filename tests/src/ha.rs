//! What the HA end-to-end tests share: the other host, "protected", their timeouts, a
//! counter that runs on without a gap, and an HA tiny guest started and protected.

use std::time::Duration;

use proto::v1 as pb;

use crate::{COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

/// The first full copy of the 16 MiB disk over the A-Links takes well under a second idle;
/// generous for a loaded machine.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Lost detection (host lease TTL 2 s, an etcd election when the dead host held etcd's
/// leader, a takeover when it served), the start on the peer and a boot under TCG.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The other host of the lab's pair.
pub fn other(node: &str) -> &'static str {
    if node == "n0" { "n1" } else { "n0" }
}

/// Whether `vm` runs with its disks mirrored in sync to the peer.
pub fn protected(vm: &pb::Vm) -> bool {
    vm.state() == pb::VmState::Running
        && vm
            .protection
            .as_ref()
            .is_some_and(|p| p.state == "protected")
}

/// Waits for `count` new counters of `vm` after `before` under the same boot, one by one: the
/// guest ran on without a reboot or a gap.
pub fn assert_counts_on(
    lab: &Lab,
    vm: &pb::Vm,
    before: &(u64, String),
    count: usize,
) -> Vec<(u64, String)> {
    let after = Console::new(lab, vm).wait_counters(count, COUNTER_PERIOD_TIMEOUT);
    assert!(
        after.iter().all(|(_, boot)| *boot == before.1),
        "rebooted: {after:?} after {before:?}"
    );
    assert!(after[0].0 > before.0, "{after:?} after {before:?}");
    assert!(after.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{after:?}");
    after
}

impl Lab {
    /// Creates HA tiny guest `name`, starts it, waits for its first counter, and returns it
    /// once it is protected (within `timeout`).
    pub async fn start_protected(&self, name: &str, timeout: Duration) -> pb::Vm {
        self.start_protected_as(name, pb::ProtectionMode::Ha, timeout)
            .await
    }

    /// Like [`Lab::start_protected`], in `mode` (HA or FT: FT is protected once its first
    /// checkpoint committed).
    pub async fn start_protected_as(
        &self,
        name: &str,
        mode: pb::ProtectionMode,
        timeout: Duration,
    ) -> pb::Vm {
        let request = pb::CreateVmRequest {
            mode: mode.into(),
            ..tiny_guest(name)
        };
        self.start_protected_from(request, timeout).await
    }

    /// Like [`Lab::start_protected`], for the VM that `request` creates.
    pub async fn start_protected_from(
        &self,
        request: pb::CreateVmRequest,
        timeout: Duration,
    ) -> pb::Vm {
        let mut api = self.client().await;
        let (name, mode) = (request.name.clone(), request.mode());
        let name = name.as_str();
        let vm = api
            .create_vm(request)
            .await
            .unwrap_or_else(|e| panic!("creating {mode:?} VM {name}: {e}"))
            .into_inner();
        let console = Console::new(self, &vm);
        api.start_vm(pb::StartVmRequest { vm: name.into() })
            .await
            .unwrap_or_else(|e| panic!("starting {mode:?} VM {name}: {e}"));
        console.wait_counters(1, GUEST_BOOT_TIMEOUT);
        self.wait_vm(name, "protected", timeout, protected).await
    }
}
