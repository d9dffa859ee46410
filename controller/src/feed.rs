//! A client-streaming call to an agent, fed message by message: an ISO copy, an imported
//! disk. Each message waits for room in a short queue, so the agent paces its sender and
//! memory stays bounded; an agent that ends its call early gives its own error as the cause.
//! Dropped before [`Feed::close`], a feed cancels its call, which makes the agent discard
//! what it received.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::agents;
use crate::error::{ApiError, chain};

/// Messages queued per call.
const DEPTH: usize = 4;
/// How long an agent may take one message before the feed fails.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One streaming call in progress.
#[derive(Debug)]
pub struct Feed<M, R> {
    node: String,
    what: &'static str,
    tx: Option<mpsc::Sender<M>>,
    call: JoinHandle<Result<R, agents::Error>>,
}

impl<M: Send + 'static, R: Send + 'static> Feed<M, R> {
    /// Opens `call` to `node` with `header` as its first message; `what` names the transfer
    /// in errors ("the ISO", "disk 1").
    pub fn open<F, Fut>(node: &str, what: &'static str, header: M, call: F) -> Feed<M, R>
    where
        F: FnOnce(ReceiverStream<M>) -> Fut,
        Fut: Future<Output = Result<R, agents::Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(DEPTH);
        // The receiver is alive and the channel empty: this cannot fail.
        let _ = tx.try_send(header);
        Feed {
            node: node.to_string(),
            what,
            tx: Some(tx),
            call: tokio::spawn(call(ReceiverStream::new(rx))),
        }
    }

    /// The node fed.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sends the next message.
    pub async fn send(&mut self, message: M) -> Result<(), ApiError> {
        let Some(tx) = &self.tx else {
            return Err(ApiError::Internal(format!(
                "{} was already closed",
                self.what
            )));
        };
        match tokio::time::timeout(MESSAGE_TIMEOUT, tx.send(message)).await {
            Ok(Ok(())) => Ok(()),
            // The agent's call ended early: its error is the cause.
            Ok(Err(_)) => {
                let cause = match (&mut self.call).await {
                    Ok(Err(e)) => chain(&e),
                    Ok(Ok(_)) => "it ended its call".to_string(),
                    Err(e) => format!("the call's task failed: {e}"),
                };
                Err(ApiError::Unavailable(format!(
                    "node {} stopped taking {}: {cause}",
                    self.node, self.what
                )))
            }
            Err(_) => Err(ApiError::Unavailable(format!(
                "node {} took no data of {} for {MESSAGE_TIMEOUT:?}",
                self.node, self.what
            ))),
        }
    }

    /// Sends `last`, ends the stream and waits for the agent's answer.
    pub async fn close(mut self, last: M) -> Result<R, agents::Error> {
        if let Some(tx) = self.tx.take() {
            // A call that ended early answers below with its error; one that takes nothing
            // for that long is cancelled.
            if tokio::time::timeout(MESSAGE_TIMEOUT, tx.send(last))
                .await
                .is_err()
            {
                self.call.abort();
            }
        }
        match (&mut self.call).await {
            Ok(result) => result,
            Err(e) => Err(agents::Error::Task {
                node: self.node.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

impl<M, R> Drop for Feed<M, R> {
    fn drop(&mut self) {
        // Finished calls ignore this; unfinished ones are cancelled.
        self.call.abort();
    }
}
