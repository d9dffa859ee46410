//! What the HA end-to-end tests share: the other host, "protected", and an HA tiny guest
//! started and protected.

use std::time::Duration;

use proto::v1 as pb;

use crate::{Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

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

impl Lab {
    /// Creates HA tiny guest `name`, starts it, waits for its first counter, and returns it
    /// once it is protected (within `timeout`).
    pub async fn start_protected(&self, name: &str, timeout: Duration) -> pb::Vm {
        let mut api = self.client().await;
        let request = pb::CreateVmRequest {
            mode: pb::ProtectionMode::Ha.into(),
            ..tiny_guest(name)
        };
        let vm = api
            .create_vm(request)
            .await
            .unwrap_or_else(|e| panic!("creating HA VM {name}: {e}"))
            .into_inner();
        let console = Console::new(self, &vm);
        api.start_vm(pb::StartVmRequest { vm: name.into() })
            .await
            .unwrap_or_else(|e| panic!("starting HA VM {name}: {e}"));
        console.wait_counters(1, GUEST_BOOT_TIMEOUT);
        self.wait_vm(name, "protected", timeout, protected).await
    }
}
