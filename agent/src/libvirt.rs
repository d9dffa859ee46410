//! The agent's one libvirt connection, used from a pool of blocking threads.
//!
//! libvirt calls block (a destroy takes ~1.6 s, the first define of a fresh embed root runs
//! QEMU's capability probe for 5–8 s, a hung QEMU monitor holds a call for libvirt's job
//! timeout), so none of them runs on the async runtime: each runs on tokio's blocking pool
//! against the shared, thread-safe [`Connect`]. Calls on one domain are serialized by a lock
//! per domain, so a hung monitor stalls only its own domain; listing domains and reading their
//! state take no domain job and are never stuck behind one. libvirt's default event loop is
//! registered once per process, before the connection opens, and runs on its own thread; in
//! embed mode libvirt's QEMU driver (monitor I/O, reconnects) lives on it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirtState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use crate::domain;

/// Errors from the libvirt connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libvirt call failed.
    #[error("libvirt: {op}")]
    Call {
        /// The operation, e.g. "starting domain web1".
        op: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// The domain is running, so the operation would lose its state.
    #[error("domain {uuid} is running; power it off first")]
    DomainRunning {
        /// Domain UUID.
        uuid: String,
    },
    /// The domain is not running, so it has no QEMU monitor.
    #[error("domain {uuid} is not running; start it first")]
    DomainNotRunning {
        /// Domain UUID.
        uuid: String,
    },
    /// No domain with this UUID is defined.
    #[error("no domain with UUID {uuid} is defined on this host")]
    DomainUnknown {
        /// Domain UUID.
        uuid: String,
    },
    /// Registering or running libvirt's event loop failed (once per process, so kept as text).
    #[error("starting libvirt's event loop: {reason}")]
    EventLoop {
        /// What failed.
        reason: String,
    },
    /// Opening the connection failed.
    #[error("opening libvirt connection {uri}")]
    Open {
        /// Connection URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A blocking call's thread panicked or was cancelled; the agent should be restarted.
    #[error("a libvirt call's worker thread failed")]
    WorkerGone,
}

/// A domain's state as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    /// Not defined on this host.
    Undefined,
    /// Defined, not running.
    Shutoff,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Crashed.
    Crashed,
    /// Any other libvirt state.
    Other,
}

/// A domain with its state and libvirt's reason for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainStatus {
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: DomainState,
    /// libvirt's reason, e.g. "booted", "shutdown", "destroyed", "ioerror".
    pub reason: String,
    /// Whether the domain's metadata marks it self-fencing (see [`domain::self_fence_in`]).
    pub self_fence: bool,
}

/// A running domain's QEMU monitor, lent to a closure by [`Libvirt::with_monitor`].
pub struct Monitor<'a> {
    dom: &'a Domain,
    name: &'a str,
}

impl std::fmt::Debug for Monitor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("domain", &self.name)
            .finish()
    }
}

impl Monitor<'_> {
    /// Sends one QMP command (JSON text) through libvirt and returns QEMU's reply as text. An
    /// error QEMU answers (`{"error": ...}`) is a reply, not an `Err`: the caller reads it.
    pub fn qmp(&self, command: &str) -> Result<String, Error> {
        self.dom
            .qemu_monitor_command(command, 0)
            .map_err(call(format!("QMP command to domain {}", self.name)))
    }

    /// Resumes the paused guest (libvirt's resume: QEMU `cont`, libvirt's state follows).
    pub fn resume(&self) -> Result<(), Error> {
        self.dom
            .resume()
            .map(drop)
            .map_err(call(format!("resuming domain {}", self.name)))
    }
}

/// libvirt and QEMU versions, as "major.minor.micro".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// libvirt library version.
    pub libvirt: String,
    /// QEMU version.
    pub qemu: String,
}

/// Handle to the connection; cheap to clone.
#[derive(Clone)]
pub struct Libvirt {
    conn: Connect,
    uri: String,
    /// One lock per domain UUID: calls on a domain run one at a time.
    domains: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

impl Libvirt {
    /// Opens `uri` and re-attaches to every domain still running.
    pub fn open(uri: &str) -> Result<Libvirt, Error> {
        start_event_loop()?;
        let conn = Connect::open(Some(uri)).map_err(|source| Error::Open {
            uri: uri.to_string(),
            source,
        })?;
        reattach(&conn);
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
            domains: Arc::default(),
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `f` on a blocking thread and returns its result. Use for calls that take no domain
    /// job (listing, reading state) or concern no one domain.
    pub async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, Error> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(|_| Error::WorkerGone)?
    }

    /// Runs `f` for the domain `uuid` once no other call on that domain is running. A caller
    /// that gives up while waiting (a timeout) never has its call run late; one that gives up
    /// while its call runs does not free the domain for the next call until the call ends.
    async fn run_on<T, E, F>(&self, uuid: &str, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<Error> + Send + 'static,
        F: FnOnce(&Connect) -> Result<T, E> + Send + 'static,
    {
        let lock = {
            let mut domains = self
                .domains
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            domains.entry(uuid.to_string()).or_default().clone()
        };
        let turn = lock.lock_owned().await;
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let result = f(&conn);
            drop(turn);
            result
        })
        .await
        .map_err(|_| E::from(Error::WorkerGone))?
    }

    /// Runs `f` with the QEMU monitor of the running domain `uuid`, on a blocking thread and
    /// under the domain's lock: a sequence of QMP commands is never interleaved with another
    /// call on the domain, so `f` sees the block graph it leaves.
    pub async fn with_monitor<T, E, F>(&self, uuid: &str, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<Error> + Send + 'static,
        F: FnOnce(&Monitor<'_>) -> Result<T, E> + Send + 'static,
    {
        let owned = uuid.to_string();
        self.run_on(uuid, move |conn| {
            let dom = lookup(conn, &owned)?.ok_or(Error::DomainUnknown {
                uuid: owned.clone(),
            })?;
            let name = dom.name().map_err(call("reading domain name"))?;
            if !is_active(&dom, &name)? {
                return Err(E::from(Error::DomainNotRunning { uuid: owned }));
            }
            f(&Monitor {
                dom: &dom,
                name: &name,
            })
        })
        .await
    }

    /// libvirt and QEMU versions.
    pub async fn versions(&self) -> Result<Versions, Error> {
        self.run(|conn| {
            let libvirt = conn
                .lib_version()
                .map_err(call("reading libvirt version"))?;
            let qemu = conn.hyp_version().map_err(call("reading QEMU version"))?;
            Ok(Versions {
                libvirt: version_string(libvirt),
                qemu: version_string(qemu),
            })
        })
        .await
    }

    /// Every domain defined or running on this host.
    pub async fn list(&self) -> Result<Vec<DomainStatus>, Error> {
        self.run(|conn| {
            let domains = conn.list_all_domains(0).map_err(call("listing domains"))?;
            domains.iter().map(status_of).collect()
        })
        .await
    }

    /// The status of the domain `uuid` (`Undefined` if there is none).
    pub async fn status(&self, uuid: &str) -> Result<DomainStatus, Error> {
        let owned = uuid.to_string();
        self.run(move |conn| match lookup(conn, &owned)? {
            Some(dom) => status_of(&dom),
            None => Ok(undefined(&owned)),
        })
        .await
    }

    /// Where the running domain `uuid`'s QEMU serves VNC (libvirt chose the socket, in the
    /// domain's private directory); `None` when it has no VNC server.
    pub async fn vnc_socket(&self, uuid: &str) -> Result<Option<std::path::PathBuf>, Error> {
        let owned = uuid.to_string();
        self.run(move |conn| {
            let dom = lookup(conn, &owned)?.ok_or(Error::DomainUnknown {
                uuid: owned.clone(),
            })?;
            let xml = dom
                .xml_desc(0)
                .map_err(call("reading the live domain XML"))?;
            Ok(domain::vnc_socket_in(&xml))
        })
        .await
    }

    /// The ownership generation the domain's definition (the live one while it runs) was
    /// made under; `None` when it is not defined or records none.
    pub async fn generation(&self, uuid: &str) -> Result<Option<u64>, Error> {
        let owned = uuid.to_string();
        self.run(move |conn| match lookup(conn, &owned)? {
            Some(dom) => Ok(metadata_of(&dom, &owned)?.and_then(|xml| domain::generation_in(&xml))),
            None => Ok(None),
        })
        .await
    }

    /// Records `generation` in the domain's metadata, live and persistent, keeping its
    /// self-fence mark: a standby that a failover resumed runs under the failover's generation.
    pub async fn set_generation(&self, uuid: &str, generation: u64) -> Result<(), Error> {
        let owned = uuid.to_string();
        self.run_on(uuid, move |conn| {
            let Some(dom) = lookup(conn, &owned)? else {
                return Ok(());
            };
            let element = domain::metadata_element(self_fence_of(&dom, &owned)?, generation);
            let kind = i32::try_from(sys::VIR_DOMAIN_METADATA_ELEMENT).unwrap_or_default();
            let flags = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;
            dom.set_metadata(
                kind,
                Some(&element),
                Some(domain::METADATA_PREFIX),
                Some(domain::METADATA_NS),
                flags,
            )
            .map_err(call(format!(
                "recording generation {generation} of domain {owned}"
            )))
        })
        .await
    }

    /// Defines (or updates) a domain from XML.
    pub async fn define(&self, uuid: &str, xml: String) -> Result<DomainStatus, Error> {
        self.run_on(uuid, move |conn| {
            let dom = conn
                .define_domain_xml(&xml)
                .map_err(call("defining domain"))?;
            status_of(&dom)
        })
        .await
    }

    /// Starts the domain; a running domain is left as it is.
    pub async fn start(&self, uuid: &str) -> Result<DomainStatus, Error> {
        self.start_with(uuid, 0).await
    }

    /// Starts the domain paused (its guest runs no instruction until [`Libvirt::resume`]); a
    /// running domain is left as it is.
    pub async fn start_paused(&self, uuid: &str) -> Result<DomainStatus, Error> {
        self.start_with(uuid, sys::VIR_DOMAIN_START_PAUSED).await
    }

    /// Starts the domain with libvirt's create `flags` unless it runs.
    async fn start_with(&self, uuid: &str, flags: u32) -> Result<DomainStatus, Error> {
        self.with_domain(uuid, move |dom, name| {
            if !is_active(dom, name)? {
                dom.create_with_flags(flags)
                    .map_err(call(format!("starting domain {name}")))?;
            }
            status_of(dom)
        })
        .await
    }

    /// Resumes a paused domain; a running or stopped one is left as it is.
    pub async fn resume(&self, uuid: &str) -> Result<DomainStatus, Error> {
        self.with_domain(uuid, |dom, name| {
            let status = status_of(dom)?;
            if status.state == DomainState::Paused {
                dom.resume()
                    .map_err(call(format!("resuming domain {name}")))?;
                return status_of(dom);
            }
            Ok(status)
        })
        .await
    }

    /// Presses the domain's ACPI power button; a stopped domain is left as it is.
    pub async fn shutdown(&self, uuid: &str) -> Result<DomainStatus, Error> {
        self.with_domain(uuid, |dom, name| {
            if is_active(dom, name)? {
                dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    .map_err(call(format!("sending ACPI shutdown to domain {name}")))?;
            }
            status_of(dom)
        })
        .await
    }

    /// Powers the domain off at once; a stopped or unknown domain is left as it is. It does
    /// not wait for the domain's lock: pulling the plug must work on a domain whose monitor
    /// hangs (libvirt's destroy kills QEMU first, then takes its job).
    pub async fn destroy(&self, uuid: &str) -> Result<DomainStatus, Error> {
        let owned = uuid.to_string();
        self.run(move |conn| {
            let Some(dom) = lookup(conn, &owned)? else {
                return Ok(undefined(&owned));
            };
            let name = dom.name().map_err(call("reading domain name"))?;
            let dom = &dom;
            let name = name.as_str();
            // Right after a reconnect libvirt may kill QEMU yet report "not running";
            // the state read below is the truth either way.
            if is_active(dom, name)?
                && let Err(e) = dom.destroy()
                && e.code() != Enum::Known(ErrorNumber::OperationInvalid)
            {
                return Err(call(format!("destroying domain {name}"))(e));
            }
            status_of(dom)
        })
        .await
    }

    /// Powers the domain off without waiting on its QEMU. libvirt's destroy asks QEMU to exit
    /// (SIGTERM) and waits up to 10 s before SIGKILL, and a QEMU whose disk I/O hangs (a held
    /// mirror connection) exits only on that SIGKILL; a self-fence must not take that long. So
    /// a QEMU still alive `grace` after the destroy began gets SIGKILL at once.
    pub async fn destroy_now(&self, uuid: &str, grace: Duration) -> Result<DomainStatus, Error> {
        let pid = self.qemu_pid(uuid).await;
        let destroy = self.destroy(uuid);
        tokio::pin!(destroy);
        tokio::select! {
            done = &mut destroy => return done,
            () = tokio::time::sleep(grace) => {}
        }
        if let Some((pid, name)) = pid
            && qemu_of(pid, &name)
        {
            // SAFETY: kill(2) has no memory effects; the PID was checked to be this
            // domain's QEMU just above (its command line names the guest).
            #[allow(unsafe_code)]
            let killed = unsafe { libc::kill(pid, libc::SIGKILL) };
            tracing::warn!(
                vm = uuid,
                pid,
                killed = killed == 0,
                "QEMU did not exit on libvirt's SIGTERM: sent SIGKILL"
            );
        }
        destroy.await
    }

    /// The PID of the running domain's QEMU and the domain's name, from libvirt's PID file
    /// (the embedded driver's under its root, or the system daemon's).
    pub async fn qemu_pid(&self, uuid: &str) -> Option<(i32, String)> {
        let name = self.status(uuid).await.ok()?.name;
        let dir = match self.uri.strip_prefix("qemu:///embed?root=") {
            Some(root) => PathBuf::from(root).join("run/qemu"),
            None => PathBuf::from("/run/libvirt/qemu"),
        };
        let text = std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?;
        Some((text.trim().parse().ok()?, name))
    }

    /// Removes a stopped domain's definition; an unknown domain is left as it is.
    pub async fn undefine(&self, uuid: &str) -> Result<(), Error> {
        let owned = uuid.to_string();
        self.run_on(uuid, move |conn| {
            let uuid = owned;
            let Some(dom) = lookup(conn, &uuid)? else {
                return Ok(());
            };
            let name = dom.name().map_err(call("reading domain name"))?;
            if is_active(&dom, &name)? {
                return Err(Error::DomainRunning { uuid });
            }
            dom.undefine()
                .map_err(call(format!("undefining domain {name}")))
        })
        .await
    }

    async fn with_domain<F>(&self, uuid: &str, f: F) -> Result<DomainStatus, Error>
    where
        F: FnOnce(&Domain, &str) -> Result<DomainStatus, Error> + Send + 'static,
    {
        let owned = uuid.to_string();
        self.run_on(uuid, move |conn| {
            let dom = lookup(conn, &owned)?.ok_or(Error::DomainUnknown {
                uuid: owned.clone(),
            })?;
            let name = dom.name().map_err(call("reading domain name"))?;
            f(&dom, &name)
        })
        .await
    }
}

/// Touches every running domain's monitor so libvirt's reconnect threads have finished before
/// the first real command (a destroy racing them kills QEMU but reports failure).
fn reattach(conn: &Connect) {
    let Ok(domains) = conn.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE) else {
        return;
    };
    for dom in &domains {
        let name = dom.name().unwrap_or_default();
        match dom.qemu_monitor_command(r#"{"execute":"query-status"}"#, 0) {
            Ok(reply) => tracing::info!(domain = %name, %reply, "re-attached to running domain"),
            Err(e) => tracing::warn!(domain = %name, error = %e, "running domain did not answer"),
        }
    }
}

/// Registers libvirt's default event loop once per process and runs it on its own thread.
fn start_event_loop() -> Result<(), Error> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e, "libvirt event loop iteration failed");
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    match started {
        Ok(()) => Ok(()),
        Err(reason) => Err(Error::EventLoop {
            reason: reason.clone(),
        }),
    }
}

/// Whether process `pid` is the QEMU of domain `name` (libvirt passes `-name guest=NAME,...`).
fn qemu_of(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wanted = format!("guest={name}");
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.split(|b| *b == b',').next() == Some(wanted.as_bytes()))
}

fn lookup(conn: &Connect, uuid: &str) -> Result<Option<Domain>, Error> {
    match conn.lookup_domain_by_uuid_string(uuid) {
        Ok(dom) => Ok(Some(dom)),
        Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(call(format!("looking up domain {uuid}"))(e)),
    }
}

fn is_active(dom: &Domain, name: &str) -> Result<bool, Error> {
    dom.is_active()
        .map_err(call(format!("reading state of domain {name}")))
}

fn status_of(dom: &Domain) -> Result<DomainStatus, Error> {
    let name = dom.name().map_err(call("reading domain name"))?;
    let uuid = dom
        .uuid_string()
        .map_err(call(format!("reading UUID of domain {name}")))?;
    let (state, reason) = dom
        .state()
        .map_err(call(format!("reading state of domain {name}")))?;
    let state = match state {
        Enum::Known(VirtState::Running | VirtState::Blocked) => DomainState::Running,
        Enum::Known(VirtState::Paused | VirtState::PMSuspended) => DomainState::Paused,
        Enum::Known(VirtState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(VirtState::Shutoff) => DomainState::Shutoff,
        Enum::Known(VirtState::Crashed) => DomainState::Crashed,
        _ => DomainState::Other,
    };
    let reason = match reason {
        Enum::Known(r) => r.to_string().to_lowercase(),
        Enum::Unknown(code) => format!("reason {code}"),
    };
    let self_fence = self_fence_of(dom, &name)?;
    Ok(DomainStatus {
        uuid,
        name,
        state,
        reason,
        self_fence,
    })
}

/// Reads the agent's metadata element (no QEMU monitor, no domain job: libvirt answers from
/// the definition it holds, the live one while the domain runs); `None` without one.
fn metadata_of(dom: &Domain, name: &str) -> Result<Option<String>, Error> {
    let kind = i32::try_from(sys::VIR_DOMAIN_METADATA_ELEMENT).unwrap_or_default();
    match dom.metadata(kind, Some(domain::METADATA_NS), 0) {
        Ok(xml) => Ok(Some(xml)),
        Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomainMetadata) => Ok(None),
        Err(e) => Err(call(format!("reading metadata of domain {name}"))(e)),
    }
}

/// Whether the metadata marks the domain self-fencing; a domain without any does not.
fn self_fence_of(dom: &Domain, name: &str) -> Result<bool, Error> {
    Ok(metadata_of(dom, name)?.is_some_and(|xml| domain::self_fence_in(&xml)))
}

fn undefined(uuid: &str) -> DomainStatus {
    DomainStatus {
        uuid: uuid.to_string(),
        name: String::new(),
        state: DomainState::Undefined,
        reason: String::new(),
        self_fence: false,
    }
}

fn call(op: impl Into<String>) -> impl FnOnce(virt::error::Error) -> Error {
    let op = op.into();
    move |source| Error::Call { op, source }
}

/// Formats libvirt's packed version number (major * 1e6 + minor * 1e3 + micro).
fn version_string(packed: u32) -> String {
    format!(
        "{}.{}.{}",
        packed / 1_000_000,
        packed / 1_000 % 1_000,
        packed % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_of_matches_the_guest_name_argument_only() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30", "guest=web,debug-threads=on"])
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Until the child has exec'd, its command line is still the test's.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sh\0"))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }

        let (web, we) = (qemu_of(pid, "web"), qemu_of(pid, "we"));
        child.kill().unwrap();
        child.wait().unwrap();

        assert!(web);
        assert!(!we, "a prefix of the name is another guest");
        assert!(!qemu_of(pid, "web"), "a dead process is no QEMU");
    }

    #[test]
    fn version_string_unpacks_qemu_version() {
        let text = version_string(10_000_002);

        assert_eq!(text, "10.0.2");
    }

    #[test]
    fn version_string_unpacks_libvirt_version() {
        let text = version_string(9_000_000);

        assert_eq!(text, "9.0.0");
    }
}
