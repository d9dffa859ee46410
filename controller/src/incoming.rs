//! A file a client streams in (an ISO upload, an import): its parts in order, read as bytes
//! counted against the size announced up front and hashed on the way, then checked at the
//! end against the SHA-256 the client sends last. A short, long or altered stream is refused
//! with what was wrong, so the caller keeps nothing of it.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt};

use crate::error::ApiError;

/// How long a client may send nothing before its upload is dropped: a suspended laptop must
/// not hold a VM (or an ISO name) and its hosts' partial files for ever.
const PART_TIMEOUT: Duration = Duration::from_secs(60);

/// A part of an upload after its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The next bytes.
    Data(Vec<u8>),
    /// Lowercase hex SHA-256 of all bytes; the last part.
    Sha256(String),
}

/// The bytes of a file as they arrive.
#[derive(Debug)]
pub struct Incoming<S> {
    parts: S,
    announced: u64,
    received: u64,
    hasher: Sha256,
    claimed: Option<String>,
    ended: bool,
    buf: Vec<u8>,
    pos: usize,
}

impl<S> Incoming<S>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    /// Reads a file of `announced` bytes from `parts`.
    pub fn new(parts: S, announced: u64) -> Incoming<S> {
        Incoming {
            parts,
            announced,
            received: 0,
            hasher: Sha256::new(),
            claimed: None,
            ended: false,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Up to `max` of the next bytes; `None` once the file has ended.
    pub async fn read_some(&mut self, max: usize) -> Result<Option<Vec<u8>>, ApiError> {
        if self.pos == self.buf.len() && !self.fill().await? {
            return Ok(None);
        }
        let end = self.buf.len().min(self.pos + max);
        let out = if self.pos == 0 && end == self.buf.len() {
            std::mem::take(&mut self.buf)
        } else {
            self.buf[self.pos..end].to_vec()
        };
        self.pos = if self.buf.is_empty() { 0 } else { end };
        Ok(Some(out))
    }

    /// The next `n` bytes; `None` if the file ends before them.
    pub async fn read_exact(&mut self, n: usize) -> Result<Option<Vec<u8>>, ApiError> {
        while self.buf.len() - self.pos < n {
            if !self.fill().await? {
                return Ok(None);
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(Some(out))
    }

    /// The next `n` bytes (fewer if the file is shorter), left to be read.
    pub async fn peek(&mut self, n: usize) -> Result<&[u8], ApiError> {
        while self.buf.len() - self.pos < n && self.fill().await? {}
        let end = self.buf.len().min(self.pos + n);
        Ok(&self.buf[self.pos..end])
    }

    /// Checks that every byte was read and that all of them are the file announced: its size
    /// and the client's SHA-256, which it returns.
    pub async fn finish(mut self) -> Result<String, ApiError> {
        if self.pos < self.buf.len() || self.fill().await? {
            return Err(ApiError::invalid(
                "data",
                "the file goes on past its end; nothing was kept",
            ));
        }
        if self.next_part().await?.is_some() {
            return Err(ApiError::invalid(
                "sha256",
                "the checksum must be the upload's last part; nothing was kept",
            ));
        }
        if self.received != self.announced {
            return Err(ApiError::invalid(
                "size_bytes",
                format!(
                    "the upload ended after {} of the {} bytes it announced; nothing was kept",
                    self.received, self.announced
                ),
            ));
        }
        let sha256 = format!("{:x}", self.hasher.finalize());
        match self.claimed {
            None => Err(ApiError::invalid(
                "sha256",
                "the upload ended without its checksum; nothing was kept",
            )),
            Some(claimed) if claimed != sha256 => Err(ApiError::invalid(
                "sha256",
                format!(
                    "checksum mismatch: the bytes received hash to {sha256}, the uploader announced {claimed}; nothing was kept"
                ),
            )),
            Some(_) => Ok(sha256),
        }
    }

    /// The client's next part, if it sends one within [`PART_TIMEOUT`].
    async fn next_part(&mut self) -> Result<Option<Part>, ApiError> {
        match tokio::time::timeout(PART_TIMEOUT, self.parts.next()).await {
            Ok(part) => part.transpose(),
            Err(_) => Err(ApiError::Unavailable(format!(
                "the upload sent nothing for {PART_TIMEOUT:?}; nothing was kept"
            ))),
        }
    }

    /// Appends the next data part to the buffer; false once the parts have ended.
    async fn fill(&mut self) -> Result<bool, ApiError> {
        loop {
            if self.ended {
                return Ok(false);
            }
            match self.next_part().await? {
                None => {
                    self.ended = true;
                }
                Some(Part::Sha256(sha256)) => {
                    self.claimed = Some(sha256.to_ascii_lowercase());
                    self.ended = true;
                }
                Some(Part::Data(data)) if data.is_empty() => {}
                Some(Part::Data(data)) => {
                    self.received = self.received.saturating_add(data.len() as u64);
                    if self.received > self.announced {
                        return Err(ApiError::invalid(
                            "size_bytes",
                            format!(
                                "the upload announced {} bytes but sent more",
                                self.announced
                            ),
                        ));
                    }
                    self.hasher.update(&data);
                    if self.pos == self.buf.len() {
                        self.buf = data;
                    } else {
                        self.buf.drain(..self.pos);
                        self.buf.extend_from_slice(&data);
                    }
                    self.pos = 0;
                    return Ok(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(
        parts: Vec<Part>,
        announced: u64,
    ) -> Incoming<impl Stream<Item = Result<Part, ApiError>> + Unpin> {
        Incoming::new(tokio_stream::iter(parts.into_iter().map(Ok)), announced)
    }

    fn sha(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    #[tokio::test]
    async fn reads_across_parts_and_checks_the_whole() {
        let parts = vec![
            Part::Data(b"abc".to_vec()),
            Part::Data(b"defg".to_vec()),
            Part::Sha256(sha(b"abcdefg").to_uppercase()),
        ];
        let mut file = incoming(parts, 7);

        assert_eq!(file.peek(5).await.unwrap(), b"abcde");
        assert_eq!(file.read_exact(2).await.unwrap().unwrap(), b"ab");
        assert_eq!(file.read_some(3).await.unwrap().unwrap(), b"cde");
        assert_eq!(file.read_exact(2).await.unwrap().unwrap(), b"fg");
        assert_eq!(file.read_some(10).await.unwrap(), None);
        assert_eq!(file.finish().await.unwrap(), sha(b"abcdefg"));
    }

    #[tokio::test]
    async fn short_long_unread_and_altered_files_are_refused() {
        let mut short = incoming(
            vec![Part::Data(b"ab".to_vec()), Part::Sha256(sha(b"ab"))],
            3,
        );
        short.read_some(3).await.unwrap();
        let err = short.finish().await.unwrap_err().to_string();
        assert!(err.contains("after 2 of the 3"), "{err}");

        let mut long = incoming(vec![Part::Data(b"abcd".to_vec())], 3);
        long.read_some(1).await.unwrap_err();

        let unread = incoming(
            vec![Part::Data(b"abc".to_vec()), Part::Sha256(sha(b"abc"))],
            3,
        );
        unread.finish().await.unwrap_err();

        let mut altered = incoming(
            vec![Part::Data(b"abc".to_vec()), Part::Sha256(sha(b"abd"))],
            3,
        );
        altered.read_exact(3).await.unwrap();
        let err = altered.finish().await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");

        let mut unsigned = incoming(vec![Part::Data(b"abc".to_vec())], 3);
        unsigned.read_exact(3).await.unwrap();
        unsigned.finish().await.unwrap_err();
    }

    #[tokio::test]
    async fn a_file_that_ends_early_reads_as_none() {
        let mut file = incoming(vec![Part::Data(b"ab".to_vec())], 3);

        assert_eq!(file.read_exact(3).await.unwrap(), None);
    }
}
