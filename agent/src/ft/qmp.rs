//! The agent's own QMP connection to an FT domain's QEMU (the `-qmp` socket that
//! [`crate::domain::FtDomain`] adds): one command at a time, events skipped. The epoch loop
//! runs every few tens of milliseconds and must not queue behind libvirt's per-connection
//! thread, so it talks to QEMU directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest a QMP reply may take before the connection is given up (a stuck QEMU).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QMP connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("connecting to QEMU's QMP socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed, or QEMU closed it.
    #[error("QMP connection to {path} failed during {command}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The command under way.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not answer in time.
    #[error("QEMU at {path} did not answer {command} within {REPLY_TIMEOUT:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command under way.
        command: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("QEMU at {path} sent a line that is not QMP JSON: {line}")]
    Garbled {
        /// The socket.
        path: PathBuf,
        /// The line.
        line: String,
    },
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
}

impl Qmp {
    /// Connects to `path`, reads QEMU's greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, Error> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| Error::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        };
        qmp.read_message("greeting").await?;
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// Connects to `path`, retrying while the socket does not exist yet or refuses (QEMU is
    /// still starting), up to `timeout`.
    pub async fn connect_within(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Qmp::connect(path).await {
                Ok(qmp) => return Ok(qmp),
                Err(e @ Error::Connect { .. }) if tokio::time::Instant::now() >= deadline => {
                    return Err(e);
                }
                Err(Error::Connect { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `command` with `arguments` (`Value::Null` for none); its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        let request = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| self.io(command, source))?;
        loop {
            let message = self.read_message(command).await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                return Err(Error::Refused {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // Anything else is an asynchronous event.
        }
    }

    /// Resumes the guest whatever state a checkpoint left it in: a refused `cont` is retried
    /// for up to `timeout`, and a guest found running by then counts as resumed.
    pub async fn resume(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.execute("cont", Value::Null).await {
                Ok(_) => return Ok(()),
                Err(Error::Refused { .. }) if tokio::time::Instant::now() < deadline => {
                    if self.status().await? == "running" {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends this connection (QEMU sees it closed): a `-qmp` socket serves one client at a
    /// time, so a new connection is only greeted once the old one is gone.
    pub async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, Error> {
        let value = self.execute("query-status", Value::Null).await?;
        Ok(value
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    async fn read_message(&mut self, command: &str) -> Result<Value, Error> {
        self.line.clear();
        let read = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut self.line))
            .await
            .map_err(|_| Error::Timeout {
                path: self.path.clone(),
                command: command.to_string(),
            })?;
        match read {
            Ok(0) => Err(self.io(
                command,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
            )),
            Ok(_) => serde_json::from_str(&self.line).map_err(|_| Error::Garbled {
                path: self.path.clone(),
                line: self.line.trim_end().to_string(),
            }),
            Err(source) => Err(self.io(command, source)),
        }
    }

    fn io(&self, command: &str, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            command: command.to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, then answers each request line with the next canned reply lines.
    async fn fake_qemu(replies: Vec<&'static str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut buf = [0u8; 4096];
            for reply in std::iter::once("{\"return\": {}}\n").chain(replies) {
                if stream.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                stream.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn execute_skips_events_and_answers_the_return_value() {
        let (_dir, path) = fake_qemu(vec![
            "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n",
        ])
        .await;
        let mut qmp = Qmp::connect(&path).await.unwrap();

        assert_eq!(qmp.status().await.unwrap(), "paused");
    }

    #[tokio::test]
    async fn execute_turns_a_qmp_error_into_a_refusal() {
        let (_dir, path) = fake_qemu(vec![
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
        ])
        .await;
        let mut qmp = Qmp::connect(&path).await.unwrap();

        let error = qmp.execute("cont", Value::Null).await.unwrap_err();

        assert!(
            matches!(&error, Error::Refused { command, class, desc } if command == "cont" && class == "GenericError" && desc == "no"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_closed_socket_is_an_io_error_naming_the_command() {
        let (_dir, path) = fake_qemu(vec![]).await;
        let mut qmp = Qmp::connect(&path).await.unwrap();

        let error = qmp.execute("stop", Value::Null).await.unwrap_err();

        assert!(
            matches!(&error, Error::Io { command, .. } if command == "stop"),
            "{error:?}"
        );
    }
}
