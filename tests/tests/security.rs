//! End to end in the lab: the agent API admits only the controllers. `pvctl lab up` makes the
//! lab's certificates; an agent serves TLS and admits only a client certificate from the
//! controllers' CA. Plain HTTP/2, TLS without a client certificate and TLS with another
//! certificate of the lab (an agent's) are refused; a controller's certificate is admitted,
//! and the pair, which calls the agents that way, creates and starts a VM. The public API is
//! TLS only: plain HTTP/2 is refused, and pvctl trusts no other CA than the pair's.
//!
//! And every API call needs a token: none, an unknown one and a deleted one are refused; a
//! read-only token reads but may not change anything; `pvctl login` keeps a token 0600; the
//! audit log names who did what; `/health` answers without a token, with one word.

use std::time::Duration;

use proto::agent as agent_pb;
use proto::agent::agent_client::AgentClient;
use proto::auth::{Bearer, Token};
use proto::v1 as pb;
use proto::v1::pairvisor_client::PairvisorClient;
use tests::http::WebSocketOutcome;
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_ok, pvctl_refused, tiny_guest};
use tonic::transport::Endpoint;

/// Calls n0's agent's `GetHostFacts` over plain HTTP/2 (`tls` false) or over TLS with the
/// lab's certificate `identity`: the node that answered, or why none did.
async fn facts(lab: &Lab, tls: bool, identity: Option<&str>) -> Result<String, String> {
    let endpoint = if tls {
        lab.agent_endpoint("n0", identity)
    } else {
        Endpoint::from_shared(format!("http://{}:7701", lab.node_address(0)))
            .map_err(|e| e.to_string())?
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    AgentClient::new(channel)
        .get_host_facts(agent_pb::GetHostFactsRequest {})
        .await
        .map(|r| r.into_inner().node)
        .map_err(|status| format!("{status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_controllers_reach_the_agents_and_the_api_is_tls_only() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvsa", 238);
    let pki = lab.dir().join("pki");

    let plain = facts(&lab, false, None).await;
    let anonymous = facts(&lab, true, None).await;
    let agent_cert = facts(&lab, true, Some("n1-agent")).await;
    let controller = facts(&lab, true, Some("n1-controller")).await;

    for (case, outcome) in [
        ("plain HTTP/2", plain),
        ("TLS without a client certificate", anonymous),
        ("TLS with an agent's certificate", agent_cert),
    ] {
        match outcome {
            Err(why) => eprintln!("{case}: refused: {why}"),
            Ok(node) => panic!("{case} was admitted: agent {node} answered"),
        }
    }
    assert_eq!(controller, Ok("n0".to_string()));
    let key_mode = std::fs::metadata(pki.join("n0-controller.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(key_mode, 0o600, "a private key is readable by others");

    // The public API is TLS only, and pvctl trusts only the pair's CA.
    let plain_api = Endpoint::from_shared(format!("http://{}:7400", lab.node_address(0)))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await;
    let answered = match plain_api {
        Ok(channel) => PairvisorClient::new(channel)
            .list_nodes(pb::ListNodesRequest {})
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "the public API answered plain HTTP/2");
    let other_ca = lab.pvctl_env(
        &["node-info"],
        &[("PVCTL_CA", &pki.join("controllers-ca.pem"))],
    );
    let refused = String::from_utf8_lossy(&other_ca.stderr);
    assert!(!other_ca.status.success(), "pvctl trusted another CA");
    assert!(refused.contains("--ca"), "{refused}");
    pvctl_ok(&lab.pvctl(&["node-info"]));

    // The controllers call the agents over it: a VM is created and boots.
    let mut api = lab.client().await;
    let vm = api.create_vm(tiny_guest("tls")).await.unwrap().into_inner();
    pvctl_ok(&lab.pvctl(&["vm-start", "tls"]));
    Console::new(&lab, &vm).wait_counters(1, GUEST_BOOT_TIMEOUT);

    tokens_and_roles(&lab).await;
}

/// The code a call to ListVms with `bearer` gets from the pair (`Ok` when it answers).
async fn list_with(lab: &Lab, bearer: Bearer) -> tonic::Code {
    let mut api = lab
        .api(&lab.endpoints())
        .connect_as(bearer, Duration::from_secs(3), Duration::from_secs(30))
        .await
        .unwrap();
    match api.list_vms(pb::ListVmsRequest {}).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

async fn tokens_and_roles(lab: &Lab) {
    let ca = lab.dir().join("pki").join("ca.pem");
    let system_ip = lab.endpoints().split(',').next().unwrap().to_string();

    // Without a token, or with one the pair does not know, nothing is answered.
    assert_eq!(
        list_with(lab, Bearer::default()).await,
        tonic::Code::Unauthenticated
    );
    let stranger = Token::generate().unwrap().bearer();
    assert_eq!(list_with(lab, stranger).await, tonic::Code::Unauthenticated);
    let anonymous = lab.pvctl_env(
        &["vm-info"],
        &[("PVCTL_TOKEN_FILE", &lab.dir().join("none"))],
    );
    assert!(!anonymous.status.success(), "pvctl ran without a token");

    // An admin makes a read-only token: it reads, and may not change anything.
    let made = pvctl_ok(&lab.pvctl(&["--json", "token-create", "watcher", "--role", "read-only"]));
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    let reader = Token::parse(made["token"].as_str().unwrap()).unwrap();
    let reader_file = lab.dir().join("reader.token");
    std::fs::write(&reader_file, format!("{reader}\n")).unwrap();
    assert_eq!(list_with(lab, reader.bearer()).await, tonic::Code::Ok);
    let as_reader = |args: &[&str]| lab.pvctl_env(args, &[("PVCTL_TOKEN_FILE", &reader_file)]);
    pvctl_ok(&as_reader(&["vm-info", "tls"]));
    let denied = pvctl_refused(&as_reader(&["vm-poweroff", "tls"]));
    assert!(
        denied.contains("read-only") && denied.contains("PermissionDenied"),
        "{denied}"
    );
    let denied = pvctl_refused(&as_reader(&["token-list"]));
    assert!(
        denied.contains("ListTokens needs an admin token"),
        "{denied}"
    );

    // pvctl login checks the token and keeps it for the user alone.
    let home = lab.dir().join("home");
    let login = lab.pvctl_env(
        &["login", "--token-file", reader_file.to_str().unwrap()],
        &[("XDG_CONFIG_HOME", &home)],
    );
    assert!(pvctl_ok(&login).contains("logged in as watcher (read-only)"));
    let kept = home.join("pairvisor").join("token");
    let mode = std::fs::metadata(&kept)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "the stored token is readable by others");
    assert_eq!(
        Token::parse(&std::fs::read_to_string(&kept).unwrap()).unwrap(),
        reader
    );
    let bad_login = lab.pvctl_env(
        &[
            "login",
            "--token-file",
            lab.dir().join("none").to_str().unwrap(),
        ],
        &[("XDG_CONFIG_HOME", &lab.dir().join("home2"))],
    );
    assert!(
        !bad_login.status.success(),
        "login without a token file succeeded"
    );

    // The VM's screen (the console's VNC websocket) is for admins: the token rides as a
    // subprotocol; none or a read-only one is refused before the upgrade; an admin's gets
    // the RFB greeting of the VM's QEMU, relayed from its agent.
    let admin = std::fs::read_to_string(lab.admin_token()).unwrap();
    let screen = |protocols: String| {
        let (ca, system_ip) = (ca.clone(), system_ip.clone());
        async move {
            tests::http::websocket(&ca, &system_ip, "/vnc/tls", &protocols)
                .await
                .unwrap()
        }
    };
    match screen("binary".into()).await {
        WebSocketOutcome::Refused(401, body) => assert!(body.contains("needs a token"), "{body}"),
        other => panic!("a websocket without a token got {other:?}"),
    }
    match screen(format!("binary, pairvisor.token.{reader}")).await {
        WebSocketOutcome::Refused(403, body) => {
            assert!(body.contains("/vnc needs an admin token"), "{body}")
        }
        other => panic!("a read-only websocket got {other:?}"),
    }
    assert_eq!(
        screen(format!("binary, pairvisor.token.{}", admin.trim())).await,
        WebSocketOutcome::Opened(b"RFB 003.008\n".to_vec())
    );

    // The audit log says who did what: the admin's create, the reader's refused power-off.
    let audit = pvctl_ok(&lab.pvctl(&["--json", "audit", "--limit", "1000"]));
    let audit: Vec<serde_json::Value> = serde_json::from_str(&audit).unwrap();
    let has = |who: &str, method: &str, subject: &str, outcome: &str| {
        audit.iter().any(|r| {
            r["token_name"] == who
                && r["method"] == method
                && r["subject"].as_str().unwrap_or_default().contains(subject)
                && r["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(outcome)
        })
    };
    assert!(has("admin", "CreateVm", "tls", "ok"), "{audit:#?}");
    assert!(has("admin", "CreateToken", "watcher", "ok"), "{audit:#?}");
    assert!(
        has("watcher", "PowerOffVm", "", "PermissionDenied"),
        "{audit:#?}"
    );
    assert!(has("admin", "/vnc", "vm tls", "opened"), "{audit:#?}");
    assert!(has("watcher", "/vnc", "", "PermissionDenied"), "{audit:#?}");

    // A deleted token is refused within seconds.
    pvctl_ok(&lab.pvctl(&["token-delete", &reader.id]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let code = list_with(lab, reader.bearer()).await;
        if code == tonic::Code::Unauthenticated {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a deleted token still gets {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // /health needs no token and says one word: the pair is whole and its VM runs.
    let (code, body) = tests::http::get(&ca, &system_ip, "/health", None)
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "OK\n"));
    // Also to a client that offers only HTTP/1.1 by ALPN (monitoring scripts, WebSockets).
    let (host, port) = system_ip.split_once(':').unwrap();
    let script = "import http.client, ssl, sys\n\
        ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
        ctx.set_alpn_protocols(['http/1.1'])\n\
        c = http.client.HTTPSConnection(sys.argv[2], int(sys.argv[3]), context=ctx, timeout=10)\n\
        c.request('GET', '/health')\n\
        r = c.getresponse()\n\
        print(r.status, c.sock.selected_alpn_protocol(), r.read().decode().strip())\n";
    let http1 = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&ca)
        .args([host, port])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&http1.stdout).trim(),
        "200 http/1.1 OK",
        "{}",
        String::from_utf8_lossy(&http1.stderr)
    );
    // /metrics needs a token.
    let (code, _) = tests::http::get(&ca, &system_ip, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(code, 401);
}
