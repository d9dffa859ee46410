//! WatchEvents: the pair's changes in the store, as API events, from a revision on. A call
//! that asks for "only new events" learns the revision they start after (a response header),
//! so a client whose stream breaks before any event can resume without a gap.

use std::time::Duration;

use daemon::etcd::{WatchSpec, Watched};
use proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

use super::EventStream;
use crate::error::{ApiError, chain};
use crate::events::{self, Change};
use crate::store::{Etcd, PREFIX};

/// The WatchEvents response header with the revision after which its events follow.
pub const REVISION_HEADER: &str = "x-pairvisor-revision";

/// How long WatchEvents tries to learn the store's revision.
const REVISION_BUDGET: Duration = Duration::from_secs(5);

/// The events after revision `since - 1` (`since` 0: after the store's revision now).
pub(super) async fn events(etcd: &Etcd, since: i64) -> Result<Response<EventStream>, Status> {
    let since = match since {
        0 => current_revision(etcd).await? + 1,
        since => since,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(stream_events(etcd.clone(), since, tx));
    let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as EventStream);
    if let Ok(value) = (since - 1).to_string().parse() {
        response.metadata_mut().insert(REVISION_HEADER, value);
    }
    Ok(response)
}

/// The store's revision now.
async fn current_revision(etcd: &Etcd) -> Result<i64, Status> {
    let read = etcd
        .request(
            "reading the store's revision",
            REVISION_BUDGET,
            |mut c| async move {
                let options = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only();
                c.get(PREFIX, Some(options)).await
            },
        )
        .await
        .map_err(|e| ApiError::Unavailable(chain(&e)))?;
    Ok(read.header().map_or(0, |h| h.revision()))
}

/// Sends the pair's events from revision `since` until the receiver goes away.
async fn stream_events(etcd: Etcd, since: i64, tx: mpsc::Sender<Result<pb::Event, Status>>) {
    let mut watch = etcd.watch(WatchSpec {
        key: PREFIX.to_string(),
        prefix: true,
        start_revision: since,
    });
    loop {
        let watched = tokio::select! {
            watched = watch.recv() => watched,
            () = tx.closed() => return,
        };
        match watched {
            Some(Watched::Events(events)) => {
                for api_event in events.iter().flat_map(api_events) {
                    if tx.send(Ok(api_event)).await.is_err() {
                        return;
                    }
                }
            }
            Some(Watched::Cancelled { reason }) => {
                let reason = format!("event watch cancelled: {reason}");
                let _ = tx
                    .send(Err(ApiError::FailedPrecondition(reason).into()))
                    .await;
                return;
            }
            None => return,
        }
    }
}

/// The API events a watched change means.
fn api_events(event: &etcd_client::Event) -> Vec<pb::Event> {
    let Some(kv) = event.kv() else {
        return Vec::new();
    };
    let is_put = matches!(event.event_type(), etcd_client::EventType::Put);
    let change = Change {
        revision: kv.mod_revision(),
        key: &String::from_utf8_lossy(kv.key()),
        value: is_put.then(|| kv.value()),
        prev: event.prev_kv().map(|p| p.value()),
        now_unix_ms: crate::now_unix_ms(),
    };
    events::from_change(&change)
}
