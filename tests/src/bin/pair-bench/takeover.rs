//! Measurement 1, `controller_takeover_ms`: kill -9 the serving controller of an idle pair,
//! then call CreateVm on the other controller's own address ([`TAKEOVER_RETRY_PAUSE`] apart,
//! one request ID) until one succeeds; the time from the kill to that success. `lab up` then
//! restarts the killed controller and the round waits for a healthy pair.

use std::time::{Duration, Instant};

use anyhow::bail;
use tests::Lab;
use tokio::runtime::Runtime;

use crate::api::{
    API_PORT, ATTEMPT_TIMEOUT, Client, Retrying, connect, delete_vm, serving_when_healthy,
    small_vm, wait_pair_healthy, with_id,
};
use crate::stats::millis;
use crate::{PAIR_RECOVERY_TIMEOUT, check_interrupted};

/// Pause between CreateVm attempts during a takeover: the resolution of the measurement,
/// while leaving the cores to the controller taking over.
const TAKEOVER_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Ten times the takeover target: a slower takeover is a failure, not a number.
const TAKEOVER_GIVE_UP: Duration = Duration::from_secs(30);

/// The takeover rounds.
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    pub(crate) samples: Vec<f64>,
    pub(crate) attempts: Vec<usize>,
}

/// One takeover: kill the serving controller, create through the survivor until it works.
/// Returns the milliseconds from the kill to the success and the attempts it took.
pub(crate) fn round(runtime: &Runtime, lab: &Lab, round: usize) -> anyhow::Result<(f64, usize)> {
    let endpoints = lab.api(&lab.endpoints());
    let serving = runtime.block_on(serving_when_healthy(lab))?;
    let survivor = if serving == "n0" { "n1" } else { "n0" };
    let survivor_api = format!("{}:{API_PORT}", lab.address_of(survivor));
    let client = runtime.block_on(connect(&lab.api(&survivor_api)))?;
    let name = format!("takeover-{round}");
    let killed = Instant::now();
    lab.kill9(&format!("{serving}-controller"));
    let attempts = runtime.block_on(create_until_created(&client, &name, killed))?;
    let ms = millis(killed.elapsed());
    eprintln!(
        "takeover {}: killed {serving}-controller, {survivor} created {name} after {ms:.0} ms ({attempts} attempts)",
        round + 1
    );
    lab.repair();
    runtime.block_on(wait_pair_healthy(&endpoints, PAIR_RECOVERY_TIMEOUT))?;
    runtime.block_on(async {
        let mut api = Retrying::new(endpoints.clone());
        delete_vm(&mut api, &name).await
    })?;
    Ok((ms, attempts))
}

/// Calls CreateVm for `name` on `client` every [`TAKEOVER_RETRY_PAUSE`] (one request ID)
/// until it succeeds; returns the number of attempts.
async fn create_until_created(
    client: &Client,
    name: &str,
    killed: Instant,
) -> anyhow::Result<usize> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut attempts = 0;
    let mut last = String::new();
    while killed.elapsed() < TAKEOVER_GIVE_UP {
        check_interrupted()?;
        attempts += 1;
        let request = with_id(small_vm(name), &id, ATTEMPT_TIMEOUT)?;
        match client.clone().create_vm(request).await {
            Ok(_) => return Ok(attempts),
            Err(status) => last = format!("{:?}: {}", status.code(), status.message()),
        }
        tokio::time::sleep(TAKEOVER_RETRY_PAUSE).await;
    }
    bail!(
        "no CreateVm succeeded within {TAKEOVER_GIVE_UP:?} of the kill ({attempts} attempts); last: {last}"
    )
}
