//! A user's PC on the lab's business network: a TCP client in the client namespace that asks
//! a tiny guest's counter service (`images::COUNTER_PORT`) for its counter over one connection
//! held open, a question every [`ASK_PERIOD`], and keeps every answer with when it came.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the client asks.
pub const ASK_PERIOD: Duration = Duration::from_millis(200);
/// How long one answer may take: a failover (detection, fence, resume) stalls the connection
/// while TCP retransmits with backoff; the connection must outlive it, not time out.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// One answer: when it was asked for and arrived, and the counter and boot id it carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// When the client sent the question.
    pub asked: Instant,
    /// When the client read the answer.
    pub at: Instant,
    /// The counter.
    pub counter: u64,
    /// The guest's boot id.
    pub boot: String,
}

/// The client's connection, asking in a thread of its own.
#[derive(Debug)]
pub struct CounterClient {
    answers: Arc<Mutex<Vec<Answer>>>,
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    /// A handle on the connection, to shut it down under a thread blocked reading.
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl CounterClient {
    /// Connects from network namespace `ns` to `guest`'s counter service and starts asking;
    /// panics if the connection cannot be made within `timeout`.
    pub fn connect(ns: &str, guest: Ipv4Addr, timeout: Duration) -> CounterClient {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failure = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (connected_tx, connected_rx) = std::sync::mpsc::channel();
        let thread = {
            let (ns, answers, failure, stop) = (
                ns.to_string(),
                answers.clone(),
                failure.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let stream = match connect_in(&ns, guest, timeout) {
                    Ok(stream) => stream,
                    Err(e) => {
                        let _ = connected_tx.send(Err(e));
                        return;
                    }
                };
                match stream.try_clone() {
                    Ok(handle) => {
                        let _ = connected_tx.send(Ok(handle));
                    }
                    Err(e) => {
                        let _ = connected_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                if let Err(e) = ask(stream, &answers, &stop) {
                    *failure.lock().unwrap() = Some(e);
                }
            })
        };
        let stream = match connected_rx.recv() {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => panic!(
                "connecting to {guest}:{} from {ns}: {e}",
                images::COUNTER_PORT
            ),
            Err(_) => panic!("the client thread for {guest} died"),
        };
        CounterClient {
            answers,
            failure,
            stop,
            stream,
            thread: Some(thread),
        }
    }

    /// The answers so far; panics if the connection failed (closed, reset, timed out).
    pub fn answers(&self) -> Vec<Answer> {
        if let Some(e) = self.failure.lock().unwrap().as_ref() {
            panic!("the client's connection to the guest failed: {e}");
        }
        self.answers.lock().unwrap().clone()
    }

    /// Waits until an answer arrives after `since` with a counter above `above`; returns all
    /// answers so far.
    pub fn wait_above(&self, above: u64, since: Instant, timeout: Duration) -> Vec<Answer> {
        let deadline = Instant::now() + timeout;
        loop {
            let answers = self.answers();
            if answers.iter().any(|a| a.at > since && a.counter > above) {
                return answers;
            }
            assert!(
                Instant::now() < deadline,
                "no answer with a counter above {above} within {timeout:?}; last: {:?}",
                answers.last()
            );
            std::thread::sleep(ASK_PERIOD);
        }
    }
}

impl Drop for CounterClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Enters network namespace `ns` (this thread only) and connects to the counter service.
fn connect_in(ns: &str, guest: Ipv4Addr, timeout: Duration) -> Result<TcpStream, String> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns changes
    // only the calling thread's network namespace, and this thread is ours alone.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "entering {ns}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let address = SocketAddr::from((guest, images::COUNTER_PORT));
    let deadline = Instant::now() + timeout;
    loop {
        // The guest's service starts a moment after its first counter.
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(ASK_PERIOD),
        }
    }
}

/// Asks until `stop`, keeping each answer; an error ends the connection.
fn ask(stream: TcpStream, answers: &Mutex<Vec<Answer>>, stop: &AtomicBool) -> Result<(), String> {
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        writer
            .write_all(b"?\n")
            .map_err(|e| format!("asking: {e}"))?;
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("the guest closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading an answer: {e}")),
        }
        let (counter, boot) =
            crate::parse_counter(&line).ok_or_else(|| format!("not a counter: {line:?}"))?;
        answers.lock().unwrap().push(Answer {
            asked,
            at: Instant::now(),
            counter,
            boot,
        });
        std::thread::sleep(ASK_PERIOD);
    }
    Ok(())
}
