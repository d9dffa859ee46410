//! The agent's request errors, and the gRPC status each one becomes.

use std::path::PathBuf;

use tonic::Status;

use crate::export;
use crate::fence;
use crate::import;
use crate::isos;
use crate::libvirt;
use crate::mirror;
use crate::replica;
use crate::snapshot;
use crate::storage;
use crate::upload;

/// Errors of agent requests; each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The FT data path failed: the epoch loop, its QMP connection, the serial gate or the
    /// standby receiver.
    #[error(transparent)]
    Epoch(#[from] crate::ft::epoch::Error),
    /// The FT state directory could not be made.
    #[error("making the FT directory {path}")]
    FtDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The FT QMP connection failed.
    #[error(transparent)]
    FtQmp(#[from] crate::ft::qmp::Error),
    /// The FT serial gate failed.
    #[error(transparent)]
    Output(#[from] crate::ft::output::Error),
    /// An FT domain's RAM file was not found.
    #[error(transparent)]
    RamFile(#[from] crate::ft::Error),
    /// The FT standby could not be set up or used.
    #[error("FT standby of VM {vm}: {reason}")]
    Standby {
        /// The VM.
        vm: String,
        /// What is wrong.
        reason: String,
    },
    /// The standby receiver refused.
    #[error(transparent)]
    StandbyReceiver(#[from] crate::ft::standby::Error),
    /// A boot image is missing or incomplete.
    #[error("boot image {name} is not usable on this host")]
    BootImage {
        /// Image name.
        name: String,
        /// The cause.
        #[source]
        source: images::Error,
    },
    /// The fence refused the request (or could not record it).
    #[error("refused")]
    Fence(#[from] fence::Error),
    /// A request field is missing or malformed.
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// A libvirt operation failed.
    #[error(transparent)]
    Libvirt(#[from] libvirt::Error),
    /// Starting, reading or stopping a disk mirror failed.
    #[error(transparent)]
    Mirror(#[from] mirror::Error),
    /// A mirror request reached a host that has no path to its peer's replicas.
    #[error("{op}: this host has no A-Link configured, so it cannot reach the peer's replicas")]
    NoALink {
        /// The request.
        op: &'static str,
    },
    /// An HA replica request reached a host without a replica service.
    #[error("{op}: this host has no HA replica service (its agent config has no [alink] section)")]
    NoReplicaService {
        /// The request.
        op: &'static str,
    },
    /// A replica service operation failed.
    #[error(transparent)]
    Replica(#[from] replica::Error),
    /// A storage operation failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// A blocking worker of the request panicked or was cancelled.
    #[error("{op}: its worker failed: {reason}")]
    Worker {
        /// What the worker did.
        op: &'static str,
        /// The join error.
        reason: String,
    },
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// An ISO library operation failed.
    #[error(transparent)]
    Iso(#[from] isos::Error),
    /// Importing an image into a new volume failed.
    #[error(transparent)]
    Import(#[from] import::Error),
    /// Converting a volume for export failed.
    #[error(transparent)]
    Export(#[from] export::Error),
    /// A screenshot failed.
    #[error(transparent)]
    Screen(#[from] crate::screen::Error),
    /// The spec names a network this host does not have.
    #[error("network {name} is not configured on this host (known: {known})")]
    UnknownNetwork {
        /// Network name.
        name: String,
        /// Configured networks.
        known: String,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = daemon::error_chain(&e);
        match &e {
            Error::InvalidRequest { .. } | Error::UnknownNetwork { .. } => {
                Status::invalid_argument(message)
            }
            Error::BootImage { .. }
            | Error::NoALink { .. }
            | Error::Mirror(
                mirror::Error::DiskUnknown { .. }
                | mirror::Error::MirroredElsewhere { .. }
                | mirror::Error::Libvirt(libvirt::Error::DomainNotRunning { .. }),
            )
            | Error::NoReplicaService { .. }
            | Error::Replica(replica::Error::ClaimExport { .. }) => {
                Status::failed_precondition(message)
            }
            Error::Replica(replica::Error::DuplicateExport { .. }) => {
                Status::invalid_argument(message)
            }
            Error::Fence(fence::Error::Load { .. } | fence::Error::Persist { .. }) => {
                Status::internal(message)
            }
            // A stale generation is this VM's record being behind, not another controller
            // serving: the caller fails the command but keeps its role.
            Error::Fence(fence::Error::Refused(fence::Refusal::StaleGeneration { .. })) => {
                Status::failed_precondition(message)
            }
            Error::Fence(fence::Error::Refused(_)) => Status::aborted(message),
            Error::Libvirt(libvirt::Error::DomainRunning { .. })
            | Error::Screen(
                crate::screen::Error::NoScreen { .. }
                | crate::screen::Error::Libvirt(libvirt::Error::DomainNotRunning { .. }),
            ) => Status::failed_precondition(message),
            Error::Libvirt(libvirt::Error::DomainUnknown { .. })
            | Error::Screen(crate::screen::Error::Libvirt(libvirt::Error::DomainUnknown {
                ..
            }))
            | Error::Mirror(mirror::Error::Libvirt(libvirt::Error::DomainUnknown { .. })) => {
                Status::not_found(message)
            }
            Error::Mirror(mirror::Error::PeerUnreachable { .. }) => Status::unavailable(message),
            Error::Storage(
                storage::Error::InvalidName { .. }
                | storage::Error::InvalidSize { .. }
                | storage::Error::UnknownGroup { .. },
            ) => Status::invalid_argument(message),
            Error::Storage(storage::Error::Exists { .. }) => Status::already_exists(message),
            Error::Iso(
                isos::Error::Upload(upload::Error::Size { .. } | upload::Error::Checksum { .. })
                | isos::Error::Storage(
                    storage::Error::InvalidName { .. } | storage::Error::UnknownGroup { .. },
                ),
            ) => Status::invalid_argument(message),
            Error::Iso(isos::Error::Missing { .. }) => Status::failed_precondition(message),
            Error::Snapshot(
                snapshot::Error::Missing { .. }
                | snapshot::Error::Running { .. }
                | snapshot::Error::NotLocal { .. }
                | snapshot::Error::DiskUnknown { .. }
                | snapshot::Error::Libvirt(libvirt::Error::DomainNotRunning { .. }),
            ) => Status::failed_precondition(message),
            Error::Snapshot(snapshot::Error::NoSpace { .. }) => Status::resource_exhausted(message),
            Error::Snapshot(snapshot::Error::Storage(
                storage::Error::InvalidName { .. } | storage::Error::UnknownGroup { .. },
            )) => Status::invalid_argument(message),
            Error::Iso(isos::Error::Upload(upload::Error::NoSpace { .. }))
            | Error::Import(
                import::Error::NoSpace { .. }
                | import::Error::Upload(upload::Error::NoSpace { .. }),
            ) => Status::resource_exhausted(message),
            Error::Import(
                import::Error::Upload(upload::Error::Size { .. } | upload::Error::Checksum { .. })
                | import::Error::Unreadable { .. }
                | import::Error::NotSelfContained { .. }
                | import::Error::TooLarge { .. }
                | import::Error::Storage(
                    storage::Error::InvalidName { .. } | storage::Error::UnknownGroup { .. },
                ),
            ) => Status::invalid_argument(message),
            Error::Import(import::Error::Exists { .. }) => Status::already_exists(message),
            Error::Import(import::Error::Superseded) => Status::aborted(message),
            Error::Export(export::Error::NoSpace { .. }) => Status::resource_exhausted(message),
            Error::Export(
                export::Error::Missing { .. }
                | export::Error::Running { .. }
                | export::Error::Snapshot(snapshot::Error::Missing { .. }),
            ) => Status::failed_precondition(message),
            Error::Export(export::Error::Storage(
                storage::Error::InvalidName { .. } | storage::Error::UnknownGroup { .. },
            )) => Status::invalid_argument(message),
            Error::Standby { .. } => Status::failed_precondition(message),
            Error::Libvirt(_)
            | Error::Screen(_)
            | Error::Mirror(_)
            | Error::Replica(_)
            | Error::Storage(_)
            | Error::Iso(_)
            | Error::Snapshot(_)
            | Error::Export(_)
            | Error::Import(_)
            | Error::Worker { .. }
            | Error::Epoch(_)
            | Error::FtDir { .. }
            | Error::FtQmp(_)
            | Error::Output(_)
            | Error::RamFile(_)
            | Error::StandbyReceiver(_) => Status::internal(message),
        }
    }
}
