//! What a guest shows: its serial console's log (tail and follow), its screen as a PNG
//! (QMP `screendump`) and live over VNC (`crate::vnc`). None of them changes the guest's
//! state or disks, so none passes the fence.

use proto::agent as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{Error, Inner, SerialStream, invalid, uuid_invalid};
use crate::serial;

impl Inner {
    /// Running domain `uuid`'s screen as PNG bytes.
    pub(super) async fn screenshot(&self, uuid: String) -> Result<Vec<u8>, Status> {
        if uuid_invalid(&uuid) {
            return Err(invalid(format!("{uuid:?} is not a UUID")).into());
        }
        let dir = self.state_dir.join("screens");
        let png = crate::screen::png(&self.deps.libvirt, &uuid, &dir)
            .await
            .map_err(Error::from)?;
        Ok(png)
    }

    /// Relays a VNC session between `input` (whose first message names the domain) and
    /// the domain's QEMU.
    pub(super) async fn vnc(
        &self,
        mut input: Streaming<pb::VncData>,
    ) -> Result<crate::vnc::Replies, Status> {
        let first = input
            .message()
            .await?
            .ok_or_else(|| invalid("the VNC stream ended before naming its domain"))?;
        if uuid_invalid(&first.uuid) {
            return Err(invalid(format!("{:?} is not a UUID", first.uuid)).into());
        }
        let socket = self
            .deps
            .libvirt
            .vnc_socket(&first.uuid)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "domain {} has no VNC server (an FT VM, or started before the console had screens)",
                    first.uuid
                ))
            })?;
        Ok(crate::vnc::relay(first.uuid, &socket, self.node.clone(), input).await?)
    }

    /// The serial log of the domain `request` names: its tail, then new output if it follows.
    pub(super) fn stream_serial(
        &self,
        request: &pb::StreamSerialRequest,
    ) -> Result<SerialStream, Status> {
        if uuid_invalid(&request.uuid) {
            return Err(invalid(format!("{:?} is not a UUID", request.uuid)).into());
        }
        let path = serial::log_path(&self.serial_dir, &request.uuid);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(serial::stream(path, request.tail_bytes, request.follow, tx));
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map(|c| pb::SerialChunk {
                offset: c.offset,
                data: c.data,
            })
            .map_err(|e| Status::internal(format!("reading serial log: {e}")))
        });
        Ok(Box::pin(stream))
    }
}
