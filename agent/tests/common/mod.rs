//! What the agent's NBD tests share: a raw client's handshake, and reading a file's bytes.

use std::path::Path;

use agent::nbd::proto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The handshake and `GO` for `export` on a fresh connection; it is then ready for requests.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, export: &str) {
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, proto::handshake());
    let flags = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
    stream.write_all(&flags.to_be_bytes()).await.unwrap();
    let mut data = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut option = proto::OPTION_MAGIC.to_be_bytes().to_vec();
    option.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    option.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    option.extend_from_slice(&data);
    stream.write_all(&option).await.unwrap();
    // INFO (export), INFO (block size), ACK.
    for _ in 0..3 {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut body = vec![0u8; usize::try_from(len).unwrap()];
        stream.read_exact(&mut body).await.unwrap();
    }
}

/// `len` bytes of the file at `path` from `offset`.
pub fn bytes(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}
