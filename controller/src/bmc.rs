//! Powering a host off through its BMC, to fence it: IPMI 2.0 over the LAN ("lanplus") with
//! `ipmitool` as a child process, the de-facto fencing client (fence_ipmilan wraps it too).
//!
//! ```text
//!  controller                                     BMC of the lost host (UDP 623)
//!    │ ipmitool -I lanplus -C 3 -N 1 -R 2 -H addr -U user -E chassis power off
//!    │  (password in IPMI_PASSWORD, not on the command line) ──► "Chassis Power Control: Down/Off"
//!    │ ipmitool … chassis power status ─────────────────────────► "Chassis Power is off"
//!    ▼ fenced only once the status says off (a BMC may acknowledge before the power drops)
//! ```
//! `-C 3` is required: without it ipmitool first asks for the cipher suites, which simulated
//! and some real BMCs do not answer (10 s lost per call). With `-N 1 -R 2` an unreachable BMC
//! fails after about 6 s (ipmitool gives up session setup twice, 1 s then 2 s per try). The
//! exit code is 1 for every failure, so a wrong password cannot be told from an unreachable
//! BMC but by its message; none of them means the host is off.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

/// The IPMI client program.
const IPMITOOL: &str = "ipmitool";
/// Cipher suite 3 (HMAC-SHA1, AES-CBC-128): what BMCs and `ipmi_sim` speak, chosen without
/// the slow probe.
const CIPHER_SUITE: &str = "3";
/// Seconds ipmitool waits for one answer (`-N`).
const ANSWER_SECONDS: &str = "1";
/// Times ipmitool tries each request (`-R`): a BMC busy powering its host off (the host's
/// processes are killed while it answers) gets a second chance.
const RETRIES: &str = "2";
/// Time for one ipmitool run: its own give-up time for an unreachable BMC (about 6 s with
/// `-N 1 -R 2`) plus margin for a loaded machine; the child is killed past it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(10);
/// Status reads after a power-off until the BMC says off.
const STATUS_READS: u32 = 5;
/// Pause between those reads.
const STATUS_PAUSE: Duration = Duration::from_millis(200);
/// IPMI 2.0 passwords are at most 20 bytes.
const MAX_PASSWORD: usize = 20;

/// How to reach a host's BMC. The password may sit in the controller's config file (keep it
/// mode 0600); ipmitool gets it through its environment, never on its command line.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bmc {
    /// The BMC's address (IP or host name) on the management network.
    pub address: String,
    /// Its UDP port (623, RMCP's, unless the BMC says otherwise).
    #[serde(default = "default_port")]
    pub port: u16,
    /// IPMI user allowed to control the chassis power (operator or administrator).
    pub user: String,
    /// That user's password (at most 20 bytes).
    pub password: String,
}

fn default_port() -> u16 {
    623
}

impl fmt::Debug for Bmc {
    /// Everything but the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bmc")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// A chassis power state as the BMC reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// The host has power.
    On,
    /// The host is powered off.
    Off,
}

/// Errors talking to a BMC. None of them means the host is off.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// ipmitool exited with an error (wrong credentials, BMC unreachable or refusing).
    #[error("`{command}` failed ({status}): {stderr}")]
    Exit {
        /// The command line (without the password).
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// ipmitool succeeded but printed something else than the answer expected.
    #[error("`{command}` printed {stdout:?}, not {expected}")]
    Output {
        /// The command line.
        command: String,
        /// What it printed.
        stdout: String,
        /// What was expected.
        expected: &'static str,
    },
    /// ipmitool could not be run (not installed?).
    #[error("running `{command}` (is ipmitool installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The BMC acknowledged the power-off but still reports the power on.
    #[error("BMC {address} still reports power on after powering its host off")]
    StillOn {
        /// The BMC.
        address: String,
    },
    /// ipmitool did not finish in time; it was killed.
    #[error("`{command}` did not finish within {} s; killed", timeout.as_secs())]
    Timeout {
        /// The command line.
        command: String,
        /// The time it had.
        timeout: Duration,
    },
}

impl PartialEq for Error {
    /// Same variant and the same message (an I/O cause is not compared).
    fn eq(&self, other: &Error) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Bmc {
    /// Checks what TOML cannot: a reason when the entry cannot work.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.address.trim().is_empty() || self.address.contains(char::is_whitespace) {
            return Err("address: give the BMC's IP address or host name");
        }
        if self.user.is_empty() {
            return Err("user: give the IPMI user that may control the power");
        }
        if self.password.is_empty() || self.password.len() > MAX_PASSWORD {
            return Err("password: IPMI 2.0 passwords have 1 to 20 bytes");
        }
        Ok(())
    }

    /// Fences the host: powers it off, then reads the power state until the BMC says off.
    pub async fn fence(&self) -> Result<(), Error> {
        self.power_off().await?;
        for read in 1..=STATUS_READS {
            if self.power_status().await? == Power::Off {
                return Ok(());
            }
            if read < STATUS_READS {
                tokio::time::sleep(STATUS_PAUSE).await;
            }
        }
        Err(Error::StillOn {
            address: self.address.clone(),
        })
    }

    /// Powers the host off (`chassis power off`); the BMC acknowledged it on success.
    pub async fn power_off(&self) -> Result<(), Error> {
        let command = ["chassis", "power", "off"];
        let stdout = self.run(&command).await?;
        if acknowledged_off(&stdout) {
            return Ok(());
        }
        Err(Error::Output {
            command: self.shown(&command),
            stdout,
            expected: "\"Chassis Power Control: Down/Off\"",
        })
    }

    /// The host's power state (`chassis power status`).
    pub async fn power_status(&self) -> Result<Power, Error> {
        let command = ["chassis", "power", "status"];
        let stdout = self.run(&command).await?;
        parse_status(&stdout).ok_or_else(|| Error::Output {
            command: self.shown(&command),
            stdout,
            expected: "\"Chassis Power is on|off\"",
        })
    }

    /// ipmitool's arguments for `command` (the password goes in the environment: `-E`).
    fn args(&self, command: &[&str]) -> Vec<String> {
        let port = self.port.to_string();
        let fixed = [
            "-I",
            "lanplus",
            "-C",
            CIPHER_SUITE,
            "-N",
            ANSWER_SECONDS,
            "-R",
            RETRIES,
            "-H",
            &self.address,
            "-p",
            &port,
            "-U",
            &self.user,
            "-E",
        ];
        fixed
            .iter()
            .chain(command)
            .map(|a| (*a).to_string())
            .collect()
    }

    /// The command line as errors show it.
    fn shown(&self, command: &[&str]) -> String {
        format!("{IPMITOOL} {}", self.args(command).join(" "))
    }

    /// Runs ipmitool with `command`, killing it after [`RUN_TIMEOUT`]; returns its stdout.
    async fn run(&self, command: &[&str]) -> Result<String, Error> {
        let child = Command::new(IPMITOOL)
            .args(self.args(command))
            .env("IPMI_PASSWORD", &self.password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A timed-out run is dropped with its future: the child is killed by its PID.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: self.shown(command),
                source,
            })?;
        let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| Error::Timeout {
                command: self.shown(command),
                timeout: RUN_TIMEOUT,
            })?
            .map_err(|source| Error::Spawn {
                command: self.shown(command),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() {
            return Err(Error::Exit {
                command: self.shown(command),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(stdout)
    }
}

/// The power state in `chassis power status` output ("Chassis Power is on").
fn parse_status(stdout: &str) -> Option<Power> {
    stdout.lines().find_map(
        |line| match line.trim().strip_prefix("Chassis Power is ")? {
            "on" => Some(Power::On),
            "off" => Some(Power::Off),
            _ => None,
        },
    )
}

/// Whether `chassis power off` output acknowledges it ("Chassis Power Control: Down/Off").
fn acknowledged_off(stdout: &str) -> bool {
    stdout
        .lines()
        .any(|line| line.trim() == "Chassis Power Control: Down/Off")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bmc() -> Bmc {
        Bmc {
            address: "10.100.0.100".into(),
            port: 623,
            user: "fence".into(),
            password: "fencepw".into(),
        }
    }

    #[test]
    fn args_power_off_uses_lanplus_suite_3_and_env_password() {
        let args = bmc().args(&["chassis", "power", "off"]);

        assert_eq!(
            args.join(" "),
            "-I lanplus -C 3 -N 1 -R 2 -H 10.100.0.100 -p 623 -U fence -E chassis power off"
        );
    }

    #[test]
    fn shown_command_never_contains_password() {
        let shown = bmc().shown(&["chassis", "power", "status"]);

        assert!(!shown.contains("fencepw"));
    }

    #[test]
    fn debug_hides_password() {
        let text = format!("{:?}", bmc());

        assert!(!text.contains("fencepw"));
    }

    #[test]
    fn parse_status_on_is_on() {
        let power = parse_status("Chassis Power is on\n");

        assert_eq!(power, Some(Power::On));
    }

    #[test]
    fn parse_status_off_after_noise_is_off() {
        let power = parse_status("Get HPM.x Capabilities request failed\nChassis Power is off\n");

        assert_eq!(power, Some(Power::Off));
    }

    #[test]
    fn parse_status_unknown_text_is_none() {
        let power = parse_status("Chassis Power is unknown\n");

        assert_eq!(power, None);
    }

    #[test]
    fn acknowledged_off_control_down_is_true() {
        let acknowledged = acknowledged_off("Chassis Power Control: Down/Off\n");

        assert!(acknowledged);
    }

    #[test]
    fn acknowledged_off_other_control_is_false() {
        let acknowledged = acknowledged_off("Chassis Power Control: Up/On\n");

        assert!(!acknowledged);
    }

    #[test]
    fn check_long_password_is_refused() {
        let long = Bmc {
            password: "p".repeat(21),
            ..bmc()
        };

        let reason = long.check().unwrap_err();

        assert!(reason.starts_with("password"));
    }

    #[test]
    fn check_empty_address_is_refused() {
        let empty = Bmc {
            address: " ".into(),
            ..bmc()
        };

        let reason = empty.check().unwrap_err();

        assert!(reason.starts_with("address"));
    }

    #[test]
    fn timeout_error_names_command_and_seconds() {
        let err = Error::Timeout {
            command: "ipmitool x".into(),
            timeout: RUN_TIMEOUT,
        };

        assert_eq!(
            err.to_string(),
            "`ipmitool x` did not finish within 10 s; killed"
        );
    }
}
