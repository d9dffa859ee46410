//! This host's replica service and its path to the peer's (HA).
//!
//! An HA VM's disks are mirrored synchronously to replica volumes on the peer. Each host
//! serves its replicas with the agent's NBD server ([`crate::nbd`]) on `<state_dir>/nbd.sock`,
//! reached from the peer only over the A-Links (the replicator's proxy mode, service `nbd`),
//! and reaches the peer's replicas through one socket per mirrored VM,
//! `<state_dir>/peer-nbd/<uuid>.sock`, whose connections are held when the peer side ends
//! first (see [`crate::stale`]). Both hosts run the same code; only their A-Link role (listen
//! or connect) differs.
//!
//! ```text
//!  writer host                                               standby host
//!  QEMU mirror ─► peer-nbd/<uuid>.sock (Ingress) ══ A-Links, "nbd" ══► Egress
//!                                                                      └─► nbd.sock ─► NBD server
//!                                                                            ─► replica volume files
//! ```
//!
//! FT streams take the same way: service `ft` carries each FT primary's epochs from
//! `<state_dir>/peer-ft/<uuid>.sock` to the peer's standby receiver on `<state_dir>/ft.sock`
//! ([`crate::ft::standby`]), whose disks are this server's exports.
//!
//! Exports belong to a VM and are named after their volumes. Unexporting a VM revokes its
//! exports: new connections cannot open them, open connections are closed, and once
//! [`Replicas::unexport`] returns none of their writes is running or will run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use replicator::proxy::{Egress, Hold, Ingress, LocalAddr, ProxyError, Target};
use replicator::{Endpoint, LinkError, LinkTls, StreamError};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::config::{AlinkConfig, AlinkRole};
use crate::ft::standby::Standbys;
use crate::nbd::{self, Export, Exports};
use crate::snapshot::transfer;
use crate::storage::StorageGroups;

/// The replicator service that carries NBD connections.
const NBD_SERVICE: &str = "nbd";
/// This host's NBD server socket, in the state directory.
const NBD_SOCKET: &str = "nbd.sock";
/// The directory of the sockets leading to the peer's NBD server, one per mirrored VM, in the
/// state directory.
const PEER_SOCKETS: &str = "peer-nbd";
/// The replicator service that carries FT epoch streams.
const FT_SERVICE: &str = "ft";
/// This host's FT standby receiver socket, in the state directory.
const FT_SOCKET: &str = "ft.sock";
/// The directory of the sockets leading to the peer's standby receiver, one per FT primary.
const PEER_FT_SOCKETS: &str = "peer-ft";
/// The replicator service that carries snapshot files (`crate::snapshot::transfer`).
const FILES_SERVICE: &str = "files";
/// This host's snapshot file receiver socket, in the state directory.
const FILES_SOCKET: &str = "files.sock";
/// The socket leading to the peer's snapshot file receiver, in the state directory.
const PEER_FILES_SOCKET: &str = "peer-files.sock";

/// Errors of the replica service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the A-Links' TLS could not be read.
    #[error("reading the A-Link TLS file {path}")]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The A-Links' TLS could not be set up from its files.
    #[error("setting up the A-Links' TLS (see [alink.tls] in the config)")]
    LinkTls {
        /// The cause.
        #[source]
        source: replicator::TlsError,
    },
    /// The NBD server's Unix socket could not be bound.
    #[error("binding the NBD server socket {path}")]
    BindNbd {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The directory of the sockets leading to the peer could not be made.
    #[error("making the directory {path} for the sockets to the peer's NBD server")]
    PeerDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket leading to the peer's NBD server could not be bound.
    #[error("binding the peer's NBD socket {path}")]
    BindPeer {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProxyError,
    },
    /// Another VM already exports a volume of that name.
    #[error("exporting {name} for VM {vm}: VM {owner} already exports that name")]
    ClaimExport {
        /// The VM asking.
        vm: String,
        /// The export name.
        name: String,
        /// The VM that exports it.
        owner: String,
    },
    /// The request names one export twice.
    #[error("exporting replicas of VM {vm}: export name {name} is given twice")]
    DuplicateExport {
        /// The VM.
        vm: String,
        /// The export name.
        name: String,
    },
    /// The FT standby receiver's Unix socket could not be bound.
    #[error("binding the FT standby socket {path}")]
    BindFt {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot file receiver's socket, or the one to the peer's, could not be bound.
    #[error("binding the snapshot file socket {path}")]
    BindFiles {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer's snapshot file streams could not be accepted.
    #[error("listening for the peer's {FILES_SERVICE} streams")]
    ListenFiles {
        /// The cause.
        #[source]
        source: StreamError,
    },
    /// The peer's FT streams could not be accepted.
    #[error("listening for the peer's {FT_SERVICE} streams")]
    ListenFt {
        /// The cause.
        #[source]
        source: StreamError,
    },
    /// The peer's NBD streams could not be accepted.
    #[error("listening for the peer's {NBD_SERVICE} streams")]
    ListenNbd {
        /// The cause.
        #[source]
        source: StreamError,
    },
    /// A volume could not be opened for export.
    #[error("exporting replicas of VM {vm}")]
    OpenExport {
        /// The VM.
        vm: String,
        /// The cause (names the export and its file).
        #[source]
        source: nbd::Error,
    },
    /// A socket file left by an earlier run could not be removed.
    #[error("removing stale socket {path}")]
    RemoveSocket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The A-Link endpoint could not be started.
    #[error("starting the A-Link endpoint")]
    StartLinks {
        /// The cause.
        #[source]
        source: LinkError,
    },
}

/// One export: the VM it belongs to and the file it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Served {
    vm: String,
    path: PathBuf,
}

/// What one export request changes: exports of the VM to drop, and volumes to open.
#[derive(Debug, PartialEq, Eq)]
struct Change {
    stale: Vec<String>,
    fresh: Vec<(String, PathBuf)>,
}

/// A task aborted when dropped.
#[derive(Debug)]
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This host's replica service (an NBD server reached by the peer over the A-Links) and its
/// path to the peer's. Dropping it stops both and the A-Links.
#[derive(Debug)]
pub struct Replicas {
    node: String,
    exports: Exports,
    /// Export name → owner and file.
    served: Mutex<BTreeMap<String, Served>>,
    /// Serialises export and unexport, which wait for revoked connections.
    changing: tokio::sync::Mutex<()>,
    nbd_socket: PathBuf,
    peer_dir: PathBuf,
    /// Per mirrored VM: the ingress its mirror writes through, and its serial.
    ingresses: tokio::sync::Mutex<BTreeMap<String, (Ingress, i64)>>,
    _egress: Egress,
    _server: Task,
    /// FT standbys fed by the peer's primaries.
    standbys: Standbys,
    ft_socket: PathBuf,
    ft_peer_dir: PathBuf,
    /// Per FT primary here: the ingress its epochs take to the peer's standby.
    ft_ingresses: tokio::sync::Mutex<BTreeMap<String, Ingress>>,
    _ft_egress: Egress,
    _ft_server: Task,
    peer_files: PathBuf,
    _files_ingress: Ingress,
    _files_egress: Egress,
    _files_server: Task,
    endpoint: Endpoint,
}

impl Replicas {
    /// Starts the A-Links and the NBD server on `<state_dir>/nbd.sock` (reached by the peer
    /// over the links), the FT standby receiver, and the snapshot file receiver writing into
    /// `groups`. Socket files left by an earlier run are removed first.
    pub async fn start(
        node: &str,
        config: &AlinkConfig,
        state_dir: &Path,
        groups: StorageGroups,
    ) -> Result<Replicas, Error> {
        let nbd_socket = state_dir.join(NBD_SOCKET);
        let peer_dir = state_dir.join(PEER_SOCKETS);
        remove_stale(&nbd_socket)?;
        let _ = std::fs::remove_dir_all(&peer_dir);
        std::fs::create_dir_all(&peer_dir).map_err(|source| Error::PeerDir {
            path: peer_dir.clone(),
            source,
        })?;
        let endpoint = Endpoint::start(link_config(config)?)
            .await
            .map_err(|source| Error::StartLinks { source })?;
        let listener = UnixListener::bind(&nbd_socket).map_err(|source| Error::BindNbd {
            path: nbd_socket.clone(),
            source,
        })?;
        let exports = Exports::default();
        let server = Task(tokio::spawn(nbd::serve_unix(listener, exports.clone())));
        let streams = endpoint
            .listen(NBD_SERVICE)
            .map_err(|source| Error::ListenNbd { source })?;
        let egress = Egress::start(streams, Target::Unix(nbd_socket.clone()));
        let (ft_socket, ft_peer_dir) = (state_dir.join(FT_SOCKET), state_dir.join(PEER_FT_SOCKETS));
        remove_stale(&ft_socket)?;
        let _ = std::fs::remove_dir_all(&ft_peer_dir);
        std::fs::create_dir_all(&ft_peer_dir).map_err(|source| Error::PeerDir {
            path: ft_peer_dir.clone(),
            source,
        })?;
        let standbys = Standbys::new(node, exports.clone());
        let listener = UnixListener::bind(&ft_socket).map_err(|source| Error::BindFt {
            path: ft_socket.clone(),
            source,
        })?;
        let ft_server = Task(tokio::spawn(standbys.clone().serve(listener)));
        let ft_streams = endpoint
            .listen(FT_SERVICE)
            .map_err(|source| Error::ListenFt { source })?;
        let ft_egress = Egress::start(ft_streams, Target::Unix(ft_socket.clone()));
        let files_socket = state_dir.join(FILES_SOCKET);
        let peer_files = state_dir.join(PEER_FILES_SOCKET);
        remove_stale(&files_socket)?;
        remove_stale(&peer_files)?;
        let bind_files = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::BindFiles { path, source }
        };
        let listener = UnixListener::bind(&files_socket).map_err(bind_files(&files_socket))?;
        let files_server = Task(tokio::spawn(transfer::serve(listener, groups)));
        let files_streams = endpoint
            .listen(FILES_SERVICE)
            .map_err(|source| Error::ListenFiles { source })?;
        let files_egress = Egress::start(files_streams, Target::Unix(files_socket));
        let files_ingress = Ingress::bind(
            &endpoint,
            LocalAddr::Unix(peer_files.clone()),
            FILES_SERVICE,
        )
        .await
        .map_err(|source| Error::BindPeer {
            path: peer_files.clone(),
            source,
        })?;
        tracing::info!(node, role = ?config.role, links = ?endpoint.local_addrs(), nbd = %nbd_socket.display(), ft = %ft_socket.display(), "replica service started");
        Ok(Replicas {
            node: node.to_string(),
            exports,
            served: Mutex::default(),
            changing: tokio::sync::Mutex::default(),
            nbd_socket,
            peer_dir,
            ingresses: tokio::sync::Mutex::default(),
            _egress: egress,
            _server: server,
            standbys,
            ft_socket,
            ft_peer_dir,
            ft_ingresses: tokio::sync::Mutex::default(),
            _ft_egress: ft_egress,
            _ft_server: ft_server,
            peer_files,
            _files_ingress: files_ingress,
            _files_egress: files_egress,
            _files_server: files_server,
            endpoint,
        })
    }

    /// Serves `volumes` (export name, file) of `vm_uuid` to the peer; answers the VM's export
    /// names. Idempotent: exports already serving the same file are kept (with their
    /// connections), and exports of the VM not in `volumes` are revoked.
    pub async fn export(
        &self,
        vm_uuid: &str,
        volumes: &[(String, PathBuf)],
    ) -> Result<Vec<String>, Error> {
        tracing::info!(vm = %vm_uuid, node = %self.node, op = "export-replica", volumes = volumes.len(), "replica op begin");
        let result = self.export_all(vm_uuid, volumes).await;
        match &result {
            Ok(names) => {
                tracing::info!(vm = %vm_uuid, node = %self.node, op = "export-replica", exports = ?names, "replica op end: ok");
            }
            Err(e) => {
                tracing::warn!(vm = %vm_uuid, node = %self.node, op = "export-replica", error = %daemon::error_chain(e), "replica op end: failed");
            }
        }
        result
    }

    async fn export_all(
        &self,
        vm_uuid: &str,
        volumes: &[(String, PathBuf)],
    ) -> Result<Vec<String>, Error> {
        let _changing = self.changing.lock().await;
        let change = plan(&self.served(), vm_uuid, volumes)?;
        let opened = change
            .fresh
            .into_iter()
            .map(|(name, path)| {
                let export =
                    Export::open(&name, &path, true).map_err(|source| Error::OpenExport {
                        vm: vm_uuid.to_string(),
                        source,
                    })?;
                Ok((name, path, export))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        for name in &change.stale {
            self.revoke(name).await;
        }
        for (name, path, export) in opened {
            self.exports.insert(&name, export);
            let vm = vm_uuid.to_string();
            self.served().insert(name, Served { vm, path });
        }
        Ok(volumes.iter().map(|(name, _)| name.clone()).collect())
    }

    /// Stops serving `vm_uuid`'s volumes: new connections cannot open them, open ones are
    /// closed, and once this returns none of their writes is running or will run. Answers the
    /// export names dropped (none for an unknown VM).
    pub async fn unexport(&self, vm_uuid: &str) -> Vec<String> {
        tracing::info!(vm = %vm_uuid, node = %self.node, op = "unexport-replica", "replica op begin");
        let _changing = self.changing.lock().await;
        let names: Vec<String> = self
            .served()
            .iter()
            .filter(|(_, served)| served.vm == vm_uuid)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &names {
            self.revoke(name).await;
        }
        tracing::info!(vm = %vm_uuid, node = %self.node, op = "unexport-replica", exports = ?names, "replica op end: ok");
        names
    }

    /// Whether any volume of `vm_uuid` is exported.
    pub fn exported(&self, vm_uuid: &str) -> bool {
        self.served().values().any(|served| served.vm == vm_uuid)
    }

    /// The socket through which `vm_uuid`'s mirror reaches the peer's NBD server, and its
    /// path serial (creation time, Unix ms, increasing per VM). A connection whose peer side
    /// ends first is held as `hold(serial)` says. `renew` replaces an existing socket (closing
    /// its connections: only when no mirror of the VM runs); else an existing one is kept.
    pub async fn peer_socket_for(
        &self,
        vm_uuid: &str,
        hold: impl FnOnce(i64) -> Option<Hold>,
        renew: bool,
    ) -> Result<(PathBuf, i64), Error> {
        let path = self.peer_dir.join(format!("{vm_uuid}.sock"));
        let mut ingresses = self.ingresses.lock().await;
        if !renew && let Some((_, serial)) = ingresses.get(vm_uuid) {
            return Ok((path, *serial));
        }
        let serial = ingresses
            .remove(vm_uuid)
            .map_or(0, |(_, serial)| serial + 1)
            .max(daemon::now_unix_ms());
        remove_stale(&path)?;
        let local = LocalAddr::Unix(path.clone());
        let ingress = Ingress::bind_holding(&self.endpoint, local, NBD_SERVICE, hold(serial))
            .await
            .map_err(|source| Error::BindPeer {
                path: path.clone(),
                source,
            })?;
        ingresses.insert(vm_uuid.to_string(), (ingress, serial));
        Ok((path, serial))
    }

    /// The serial of `vm_uuid`'s mirror path (0 when it has none).
    pub async fn path_serial(&self, vm_uuid: &str) -> i64 {
        self.ingresses
            .lock()
            .await
            .get(vm_uuid)
            .map_or(0, |(_, serial)| *serial)
    }

    /// Closes the socket of `vm_uuid`'s mirror and its connections (the VM is gone).
    pub async fn close_peer_socket(&self, vm_uuid: &str) {
        if self.ingresses.lock().await.remove(vm_uuid).is_some() {
            let _ = std::fs::remove_file(self.peer_dir.join(format!("{vm_uuid}.sock")));
        }
    }

    /// The export names of `vm_uuid`'s volumes.
    pub fn exports_of(&self, vm_uuid: &str) -> Vec<String> {
        self.served()
            .iter()
            .filter(|(_, served)| served.vm == vm_uuid)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Ends FT epoch mode on `vm_uuid`'s exports, applying the writes they hold: the primary
    /// lives on (it is being protected anew), so those writes are real. Answers how many.
    pub async fn settle_epochs(&self, vm_uuid: &str) -> Result<usize, Error> {
        let mut applied = 0;
        for name in self.exports_of(vm_uuid) {
            let done =
                self.exports
                    .settle_epochs(&name)
                    .await
                    .map_err(|source| Error::OpenExport {
                        vm: vm_uuid.to_string(),
                        source,
                    })?;
            applied += done.writes;
        }
        Ok(applied)
    }

    /// The FT standbys on this host, fed by the peer's primaries over the A-Links.
    pub fn standbys(&self) -> &Standbys {
        &self.standbys
    }

    /// The socket through which `vm_uuid`'s epoch loop reaches the peer's standby receiver
    /// (made on first use, kept until [`Replicas::close_peer_ft_socket`]).
    pub async fn peer_ft_socket(&self, vm_uuid: &str) -> Result<PathBuf, Error> {
        let path = self.ft_peer_dir.join(format!("{vm_uuid}.sock"));
        let mut ingresses = self.ft_ingresses.lock().await;
        if ingresses.contains_key(vm_uuid) {
            return Ok(path);
        }
        remove_stale(&path)?;
        let local = LocalAddr::Unix(path.clone());
        let ingress = Ingress::bind(&self.endpoint, local, FT_SERVICE)
            .await
            .map_err(|source| Error::BindPeer {
                path: path.clone(),
                source,
            })?;
        ingresses.insert(vm_uuid.to_string(), ingress);
        Ok(path)
    }

    /// Closes the socket of `vm_uuid`'s epoch loop and its connections (the VM is gone).
    pub async fn close_peer_ft_socket(&self, vm_uuid: &str) {
        if self.ft_ingresses.lock().await.remove(vm_uuid).is_some() {
            let _ = std::fs::remove_file(self.ft_peer_dir.join(format!("{vm_uuid}.sock")));
        }
    }

    /// The socket through which snapshot files reach the peer's receiver over the A-Links.
    pub fn peer_files_socket(&self) -> &Path {
        &self.peer_files
    }

    /// The A-Link addresses: bound (listen side, with the actual ports) or dialed (connect).
    pub fn link_addrs(&self) -> &[SocketAddr] {
        self.endpoint.local_addrs()
    }

    /// Each A-Link's state and counters.
    pub fn link_stats(&self) -> Vec<replicator::LinkStats> {
        self.endpoint.stats().links
    }

    /// Waits until `links` A-Links to the peer are up; whether that happened within `timeout`.
    pub async fn wait_links_up(&self, links: usize, timeout: Duration) -> bool {
        self.endpoint.wait_links_up(links, timeout).await
    }

    /// Removes export `name`, closing its connections, then forgets it.
    async fn revoke(&self, name: &str) {
        self.exports.remove(name).await;
        self.served().remove(name);
    }

    fn served(&self) -> MutexGuard<'_, BTreeMap<String, Served>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // Best effort: the next start removes whatever is left.
        let _ = std::fs::remove_file(&self.nbd_socket);
        let _ = std::fs::remove_dir_all(&self.peer_dir);
        let _ = std::fs::remove_file(&self.ft_socket);
        let _ = std::fs::remove_dir_all(&self.ft_peer_dir);
    }
}

/// The replicator's configuration for this host's side of the A-Links.
fn link_config(config: &AlinkConfig) -> Result<replicator::Config, Error> {
    let links = config.links.clone();
    let plain = match config.role {
        AlinkRole::Listen => replicator::Config::listen(links),
        AlinkRole::Connect => replicator::Config::connect(links),
    };
    let Some(tls) = &config.tls else {
        tracing::warn!("the A-Links run without TLS; set [alink.tls] in the config");
        return Ok(plain);
    };
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| Error::ReadTls {
            path: path.clone(),
            source,
        })
    };
    let (cert, key, ca) = (read(&tls.cert)?, read(&tls.key)?, read(&tls.ca)?);
    let secured = match config.role {
        AlinkRole::Listen => LinkTls::listen(&cert, &key, &ca),
        AlinkRole::Connect => LinkTls::connect(&cert, &key, &ca, &tls.peer),
    }
    .map_err(|source| Error::LinkTls { source })?;
    Ok(plain.with_tls(secured))
}

/// Removes the socket file at `path` if there is one.
fn remove_stale(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::RemoveSocket {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What exporting `volumes` for `vm` changes, given what is `served`: the VM's exports to
/// drop (gone, or serving another file) and the volumes to open.
fn plan(
    served: &BTreeMap<String, Served>,
    vm: &str,
    volumes: &[(String, PathBuf)],
) -> Result<Change, Error> {
    let mut wanted = BTreeMap::new();
    for (name, path) in volumes {
        if wanted.insert(name.as_str(), path).is_some() {
            return Err(Error::DuplicateExport {
                vm: vm.to_string(),
                name: name.clone(),
            });
        }
        if let Some(other) = served.get(name).filter(|s| s.vm != vm) {
            return Err(Error::ClaimExport {
                vm: vm.to_string(),
                name: name.clone(),
                owner: other.vm.clone(),
            });
        }
    }
    let unchanged = |name: &str, path: &PathBuf| {
        served
            .get(name)
            .is_some_and(|s| s.vm == vm && &s.path == path)
    };
    let stale = served
        .iter()
        .filter(|(name, s)| s.vm == vm && wanted.get(name.as_str()) != Some(&&s.path))
        .map(|(name, _)| name.clone())
        .collect();
    let fresh = volumes
        .iter()
        .filter(|(name, path)| !unchanged(name, path))
        .cloned()
        .collect();
    Ok(Change { stale, fresh })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11";
    const OTHER: &str = "0e5b1c1d-7d2a-4c55-8f0e-2b9f3f1d4a22";

    fn served(entries: &[(&str, &str, &str)]) -> BTreeMap<String, Served> {
        entries
            .iter()
            .map(|(name, vm, path)| {
                let served = Served {
                    vm: (*vm).to_string(),
                    path: PathBuf::from(path),
                };
                ((*name).to_string(), served)
            })
            .collect()
    }

    fn volume(name: &str, path: &str) -> (String, PathBuf) {
        (name.to_string(), PathBuf::from(path))
    }

    #[test]
    fn plan_of_a_new_vm_opens_every_volume() {
        let volumes = [volume("d0", "/sg0/d0"), volume("d1", "/sg0/d1")];

        let change = plan(&BTreeMap::new(), VM, &volumes).unwrap();

        assert_eq!(
            change,
            Change {
                stale: vec![],
                fresh: volumes.to_vec()
            }
        );
    }

    #[test]
    fn plan_of_the_same_export_again_changes_nothing() {
        let served = served(&[("d0", VM, "/sg0/d0")]);

        let change = plan(&served, VM, &[volume("d0", "/sg0/d0")]).unwrap();

        assert_eq!(
            change,
            Change {
                stale: vec![],
                fresh: vec![]
            }
        );
    }

    #[test]
    fn plan_with_a_moved_and_a_dropped_volume_revokes_both() {
        let served = served(&[("d0", VM, "/sg0/d0"), ("d1", VM, "/sg0/d1")]);

        let change = plan(&served, VM, &[volume("d0", "/sg1/d0")]).unwrap();

        assert_eq!(
            change,
            Change {
                stale: vec!["d0".to_string(), "d1".to_string()],
                fresh: vec![volume("d0", "/sg1/d0")]
            }
        );
    }

    #[test]
    fn plan_of_a_name_another_vm_exports_is_refused() {
        let served = served(&[("d0", OTHER, "/sg0/d0")]);

        let err = plan(&served, VM, &[volume("d0", "/sg0/d0")]).unwrap_err();

        assert_eq!(
            err.to_string(),
            format!("exporting d0 for VM {VM}: VM {OTHER} already exports that name")
        );
    }

    #[test]
    fn plan_of_a_name_given_twice_is_refused() {
        let volumes = [volume("d0", "/sg0/d0"), volume("d0", "/sg1/d0")];

        let err = plan(&BTreeMap::new(), VM, &volumes).unwrap_err();

        assert!(matches!(err, Error::DuplicateExport { .. }), "{err}");
    }

    #[test]
    fn link_config_with_a_missing_tls_file_names_it() {
        let config = AlinkConfig {
            role: AlinkRole::Listen,
            links: vec!["127.0.0.1:0".parse().unwrap()],
            tls: Some(crate::config::AlinkTls {
                cert: "/nonexistent/n0-agent.pem".into(),
                key: "/nonexistent/n0-agent.key".into(),
                ca: "/nonexistent/agents-ca.pem".into(),
                peer: "n1".into(),
            }),
        };

        let refused = link_config(&config);

        let Err(e) = refused else {
            panic!("built without its files")
        };
        assert!(
            matches!(&e, Error::ReadTls { path, .. } if path.ends_with("n0-agent.pem")),
            "{e}"
        );
    }

    #[test]
    fn link_config_of_the_connect_side_dials_the_peer() {
        let config = AlinkConfig {
            role: AlinkRole::Connect,
            links: vec!["10.102.0.1:7710".parse().unwrap()],
            tls: None,
        };

        let links = link_config(&config).unwrap();

        assert_eq!(
            (links.role, links.links),
            (replicator::Role::Connect, config.links)
        );
    }
}
