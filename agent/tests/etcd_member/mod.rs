//! One etcd member on loopback for the agent's tests that need a real etcd.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::process::{Reaped, free_port};

/// One etcd member on loopback in a temp dir, killed by PID on drop.
pub struct EtcdMember {
    _child: Reaped,
    /// Its client URL.
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdMember {
    /// Starts the member (see [`EtcdMember::client`] to wait until it answers).
    pub fn start() -> EtcdMember {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (install etcd-server)");
        EtcdMember {
            _child: Reaped(child),
            endpoint,
            _dir: dir,
        }
    }

    /// A plain client, once the member answers.
    pub async fn client(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = Client::connect([self.endpoint.as_str()], None).await
                && client.status().await.is_ok()
            {
                return client;
            }
            assert!(Instant::now() < deadline, "etcd did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
