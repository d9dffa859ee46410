//! The fence client against a real simulated BMC: OpenIPMI's `ipmi_sim` on loopback (IPMI 2.0
//! "lanplus", the cipher suite and options the controller uses), whose chassis power is a
//! script that writes a state file. Skipped, with a note, when `ipmi_sim` or `ipmitool` is not
//! installed (`scripts/install-deps.sh` installs both).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller::bmc::{Bmc, Error, Power};

/// A fresh `ipmi_sim` answers within about 0.1 s; generous for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The chassis control script: `get power` prints the state, `set power N` writes it.
const HOOK: &str = r#"#!/bin/sh
dir=$(dirname "$0")
case "$1 $2" in
  "get power") state=$(cat "$dir/power") || exit 1; echo "power:$state" ;;
  "set power") echo "$3" > "$dir/power" ;;
esac
"#;

/// A running `ipmi_sim` on 127.0.0.1, killed by its PID when dropped.
struct Sim {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sim {
    /// Starts a simulated BMC with power on; `None` when the tools are missing.
    async fn start() -> Option<Sim> {
        if !installed("ipmi_sim") || !installed("ipmitool") {
            eprintln!("ipmi_sim or ipmitool is not installed: skipping (scripts/install-deps.sh)");
            return None;
        }
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let port = free_udp_port();
        write_config(dir.path(), port);
        let child = Command::new("ipmi_sim")
            .arg("-n")
            .arg("-c")
            .arg(dir.path().join("lan.conf"))
            .arg("-f")
            .arg(dir.path().join("bmc.emu"))
            .arg("-s")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ipmi_sim");
        let sim = Sim { child, dir, port };
        sim.wait_answering().await;
        Some(sim)
    }

    fn bmc(&self, password: &str) -> Bmc {
        Bmc {
            address: "127.0.0.1".into(),
            port: self.port,
            user: "fence".into(),
            password: password.into(),
        }
    }

    /// The power state the hook last wrote.
    fn power(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("power"))
            .expect("reading the power file")
            .trim()
            .to_string()
    }

    async fn wait_answering(&self) {
        let started = Instant::now();
        while self.bmc("fencepw").power_status().await.is_err() {
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "ipmi_sim did not answer on port {} within {READY_TIMEOUT:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir: PathBuf| dir.join(tool).is_file())
    })
}

/// A UDP port free on loopback now (another test run may be using the machine).
fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    socket.local_addr().expect("reading its address").port()
}

fn write_config(dir: &Path, port: u16) {
    let hook = dir.join("hook.sh");
    std::fs::write(&hook, HOOK).expect("writing the hook");
    let status = Command::new("chmod").arg("755").arg(&hook).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "chmod of the hook failed"
    );
    let lan = format!(
        "name \"test\"\nset_working_mc 0x20\nstartlan 1\n  addr 127.0.0.1 {port}\n  priv_limit admin\n  allowed_auths_callback none\n  allowed_auths_user md5\n  allowed_auths_operator md5\n  allowed_auths_admin md5\n  guid 0123456789abcdef0123456789abcdef\nendlan\nchassis_control \"{}\"\nuser 2 true \"fence\" \"fencepw\" admin 10 md5\n",
        hook.display()
    );
    for (name, text) in [
        ("lan.conf", lan.as_str()),
        (
            "bmc.emu",
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        ),
        ("power", "1\n"),
    ] {
        std::fs::write(dir.join(name), text).expect("writing the BMC's files");
    }
    std::fs::create_dir_all(dir.join("state")).expect("creating the state directory");
}

#[tokio::test]
async fn fence_powers_the_host_off_and_status_says_off() {
    let Some(sim) = Sim::start().await else {
        return;
    };
    let bmc = sim.bmc("fencepw");
    assert_eq!(bmc.power_status().await, Ok(Power::On));

    let fenced = bmc.fence().await;

    assert_eq!(fenced, Ok(()));
    assert_eq!(sim.power(), "0");
    assert_eq!(bmc.power_status().await, Ok(Power::Off));
}

#[tokio::test]
async fn power_off_with_wrong_password_fails_and_leaves_power_on() {
    let Some(sim) = Sim::start().await else {
        return;
    };

    let err = sim.bmc("wrong").power_off().await.unwrap_err();

    assert!(
        matches!(&err, Error::Exit { stderr, .. } if stderr.contains("Unable to establish")),
        "{err}"
    );
    assert_eq!(sim.power(), "1");
}
