//! Headless Chromium driven over the DevTools protocol, for the console's end-to-end test:
//! it opens pages, runs JavaScript in them, waits for what they show and keeps screenshots.
//! One browser per test, with a profile of its own, stopped by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Debian's Chromium binary itself: `/usr/bin/chromium` is a wrapper that does not exec, so
/// its PID would not stop the browser.
const CHROMIUM: &str = "/usr/lib/chromium/chromium";
/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A running headless Chromium with one page.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    artefacts: PathBuf,
}

impl Browser {
    /// Starts Chromium and opens a blank page; screenshots go to `artefacts`. The lab's
    /// certificates come from the lab's own CA, which this throwaway profile does not know,
    /// so certificate errors are ignored (the API's TLS is tested by the gRPC tests).
    pub async fn launch(artefacts: &Path) -> Browser {
        std::fs::create_dir_all(artefacts).unwrap();
        let profile = tempfile::Builder::new()
            .prefix("pv-chromium-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-sync",
                "--mute-audio",
                "--ignore-certificate-errors",
                "--window-size=1280,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMIUM} (apt-get install chromium): {e}"));
        let url = devtools_url(profile.path()).await;
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("connecting to Chromium's DevTools at {url}: {e}"));
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
            artefacts: artefacts.to_path_buf(),
        };
        let target = browser
            .command("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = browser
            .command(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.command("Page.enable", json!({})).await;
        browser
    }

    /// Sends one DevTools command (to the page once attached) and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools {method}: no answer in {COMMAND_TIMEOUT:?}"));
            let Some(Ok(Message::Text(text))) = next else {
                match next {
                    Some(Ok(_)) => continue,
                    other => panic!("DevTools {method}: the connection ended: {other:?}"),
                }
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"].as_u64() != Some(id) {
                continue; // an event, or an earlier command's late reply
            }
            if let Some(error) = reply.get("error") {
                panic!("DevTools {method} failed: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Opens `url` and waits for its document to load.
    pub async fn goto(&mut self, url: &str) {
        self.command("Page.navigate", json!({ "url": url })).await;
        self.wait_for(
            &format!("load of {url}"),
            "document.readyState === 'complete'",
            COMMAND_TIMEOUT,
        )
        .await;
    }

    /// Runs `script` in the page (awaiting it if it is a promise) and returns its value, or
    /// the exception it threw.
    pub async fn eval(&mut self, script: &str) -> Result<Value, String> {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": script, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(exception.to_string());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `script` yields a truthy value and returns it; panics after `timeout`
    /// with `what` and the page's text.
    pub async fn wait_for(&mut self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(script).await;
            let truthy = match &value {
                Ok(Value::Bool(b)) => *b,
                Ok(Value::Null) | Err(_) => false,
                Ok(Value::String(s)) => !s.is_empty(),
                Ok(Value::Number(n)) => n.as_f64() != Some(0.0),
                Ok(_) => true,
            };
            if truthy {
                return value.unwrap_or_default();
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!(
                    "{what}: not seen in {timeout:?} ({script} gave {value:?}); the page shows:\n{text:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sets form field `id` to `value` as typing would.
    pub async fn fill(&mut self, id: &str, value: &str) {
        let script = format!(
            "(() => {{ const el = document.getElementById({id}); el.value = {value}; \
             el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); \
             return el.value === {value}; }})()",
            id = json!(id),
            value = json!(value),
        );
        let set = self.eval(&script).await;
        assert_eq!(set, Ok(json!(true)), "setting #{id} to {value:?}");
    }

    /// Clicks the first element that `selector` matches.
    pub async fn click(&mut self, selector: &str) {
        let script = format!(
            "(() => {{ const el = document.querySelector({s}); if (!el) return false; \
             el.click(); return true; }})()",
            s = json!(selector),
        );
        assert_eq!(
            self.eval(&script).await,
            Ok(json!(true)),
            "clicking {selector}"
        );
    }

    /// Types `text` (lower-case letters, digits, spaces and `\n` for Enter) as key presses
    /// into the focused element, as a keyboard would: keydown and keyup per key.
    pub async fn press_keys(&mut self, text: &str) {
        for c in text.chars() {
            let (key, code, vk) = match c {
                '\n' => ("Enter".to_string(), "Enter".to_string(), 13),
                ' ' => (" ".to_string(), "Space".to_string(), 32),
                'a'..='z' => (
                    c.to_string(),
                    format!("Key{}", c.to_ascii_uppercase()),
                    c.to_ascii_uppercase() as u32,
                ),
                '0'..='9' => (c.to_string(), format!("Digit{c}"), c as u32),
                _ => panic!("press_keys cannot type {c:?}"),
            };
            let typed = if c == '\n' {
                "\r".to_string()
            } else {
                key.clone()
            };
            for kind in ["keyDown", "keyUp"] {
                let mut event = json!({
                    "type": kind, "key": key, "code": code,
                    "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk,
                });
                if kind == "keyDown" {
                    event["text"] = json!(typed);
                }
                self.command("Input.dispatchKeyEvent", event).await;
            }
        }
    }

    /// Opens the console at `url` and logs in with `token`; waits until it shows who that is.
    pub async fn log_in(&mut self, url: &str, token: &str, timeout: Duration) {
        self.goto(url).await;
        self.wait_for(
            "the login form",
            "!document.getElementById('login').hidden",
            timeout,
        )
        .await;
        self.fill("login-token", token.trim()).await;
        self.click("#login-button").await;
        self.wait_for(
            "the console logged in",
            "document.getElementById('who').textContent",
            timeout,
        )
        .await;
    }

    /// Keeps a PNG of the page as `NAME.png` in the artefacts directory and returns its path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self
            .command("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let path = self.artefacts.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("console screenshot: {}", path.display());
        path
    }
}

/// The browser's DevTools WebSocket URL, from the `DevToolsActivePort` file Chromium writes
/// into its profile once it listens (port 0: it picked a free one).
async fn devtools_url(profile: &Path) -> String {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return format!("ws://127.0.0.1:{port}{path}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "Chromium wrote no {} in {COMMAND_TIMEOUT:?}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The main process takes its helpers (zygotes, renderers, crashpad) with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
