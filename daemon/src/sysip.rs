//! The floating system IP: the serving controller adds it to its management interface and
//! announces it with gratuitous ARP; a controller that stops serving removes it, and so does
//! the host's agent once another host serves (a controller killed outright cannot).

use tokio::process::Command;

/// The floating system IP, held by the serving controller.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemIp {
    /// Address with prefix length, e.g. "10.100.0.10/24".
    pub address: String,
    /// Interface that carries it.
    pub device: String,
}

/// Errors changing the address.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ip addr` failed.
    #[error("`ip addr {op} {address} dev {device}` failed: {stderr}")]
    Ip {
        /// "replace" or "del".
        op: &'static str,
        /// The address.
        address: String,
        /// The interface.
        device: String,
        /// Its error output.
        stderr: String,
    },
    /// `ip` could not be run.
    #[error("running `ip`")]
    Spawn {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Adds the system IP to its interface (idempotent) and announces it.
pub async fn acquire(ip: &SystemIp) -> Result<(), Error> {
    ip_addr("replace", ip).await?;
    announce(ip).await;
    Ok(())
}

/// Removes the system IP from its interface; whether it was there (absent is fine).
pub async fn release(ip: &SystemIp) -> Result<bool, Error> {
    match ip_addr("del", ip).await {
        Ok(()) => Ok(true),
        Err(Error::Ip { stderr, .. })
            if stderr.contains("Cannot assign requested address")
                || stderr.contains("Address not found") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

async fn ip_addr(op: &'static str, ip: &SystemIp) -> Result<(), Error> {
    let output = Command::new("ip")
        .args(["addr", op, &ip.address, "dev", &ip.device])
        .output()
        .await
        .map_err(|source| Error::Spawn { source })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Ip {
        op,
        address: ip.address.clone(),
        device: ip.device.clone(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Sends gratuitous ARP so neighbours drop the previous holder's MAC (best effort).
async fn announce(ip: &SystemIp) {
    let address = ip.address.split('/').next().unwrap_or(&ip.address);
    let result = Command::new("arping")
        .args(["-U", "-c", "2", "-w", "2", "-I", &ip.device, address])
        .output()
        .await;
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            tracing::warn!(address, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "gratuitous ARP failed")
        }
        Err(e) => {
            tracing::warn!(address, error = %e, "gratuitous ARP not sent (is iputils-arping installed?)")
        }
    }
}
