//! The browser console end to end: real headless Chromium against the serving controller's
//! HTTPS console on the system IP. A wrong token is refused; the admin logs in, sees both
//! hosts, gets the API's validation error inline in the create wizard, creates an FT VM there,
//! starts it and reads its COUNTER lines in the serial console. When the VM's host loses
//! power the dashboard shows the host lost and the failover event within 5 s of the API, and
//! the serial console shows the guest counting on; a read-only token is refused the VM's
//! actions with the API's error on the page. Screenshots of each step are kept under
//! the target directory's `tmp/console/`.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::browser::Browser;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, other, protected};
use tests::{GUEST_BOOT_TIMEOUT, Lab, parse_counter, tiny_guest};

/// How long the dashboard may lag the API.
const DASHBOARD_LAG: Duration = Duration::from_secs(5);
/// How long the console's page may take to load and log in, on a busy machine.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The COUNTER lines the console's terminal shows.
async fn shown_counters(browser: &mut Browser) -> Vec<(u64, String)> {
    let text = browser
        .eval("(document.querySelector('#serial .xterm-rows') || {}).innerText || ''")
        .await
        .unwrap_or_default();
    text.as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(parse_counter)
        .collect()
}

/// The state the dashboard's card of host `node` shows.
fn host_state_script(node: &str) -> String {
    format!("(document.querySelector('.host[data-node=\"{node}\"] h2 .state') || {{}}).textContent")
}

/// Polls the API until `check` holds for `name`'s record or `node`'s, returning when it did.
async fn api_sees(
    lab: &Lab,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[pb::Node], &pb::Vm) -> bool,
    vm: &str,
) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut api) = lab
            .api(&lab.endpoints())
            .connect(Duration::from_secs(2), Duration::from_secs(5))
            .await
        {
            let nodes = api.list_nodes(pb::ListNodesRequest {}).await;
            let vm = api.get_vm(pb::GetVmRequest { vm: vm.into() }).await;
            if let (Ok(nodes), Ok(vm)) = (nodes, vm)
                && check(&nodes.into_inner().nodes, &vm.into_inner())
            {
                return Instant::now();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the API never showed {what} in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_creates_an_ft_vm_and_shows_its_failover() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvwc", 228);
    let artefacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    let mut browser = Browser::launch(&artefacts).await;
    let system_ip = lab.endpoints().split(',').next().unwrap().to_string();
    let url = format!("https://{system_ip}/");

    // A wrong token is refused with the API's own words.
    browser.goto(&url).await;
    browser
        .wait_for(
            "the login form",
            "!document.getElementById('login').hidden",
            PAGE_TIMEOUT,
        )
        .await;
    browser
        .fill("login-token", "pv_nosuchid_nosuchsecret")
        .await;
    browser.click("#login-button").await;
    let refused = browser
        .wait_for(
            "a refused login",
            "document.getElementById('login-error').textContent",
            PAGE_TIMEOUT,
        )
        .await;
    assert!(
        refused.as_str().unwrap_or_default().contains("token"),
        "a wrong token was refused with {refused}"
    );
    browser.screenshot("01-login-refused").await;

    let token = std::fs::read_to_string(lab.admin_token()).unwrap();
    browser.fill("login-token", token.trim()).await;
    browser.click("#login-button").await;
    let both_up = format!(
        "{} === 'UP' && {} === 'UP'",
        host_state_script("n0"),
        host_state_script("n1")
    );
    browser
        .wait_for("both hosts up", &both_up, PAGE_TIMEOUT)
        .await;
    let who = browser
        .eval("document.getElementById('who').textContent")
        .await
        .unwrap();
    assert!(
        who.as_str().unwrap_or_default().contains("admin"),
        "logged in as {who}"
    );

    // The dashboard's load time: a fresh page (the token is kept for the tab) until both
    // hosts, their A-Links and the VM table show.
    let loading = Instant::now();
    browser.goto(&url).await;
    browser
        .wait_for(
            "the dashboard",
            &format!("{both_up} && document.querySelectorAll('.alinks tr[data-alink]').length === 4 && !!document.getElementById('vms')"),
            PAGE_TIMEOUT,
        )
        .await;
    eprintln!(
        "console dashboard loaded in {} ms",
        loading.elapsed().as_millis()
    );
    let quorum = browser
        .eval("[...document.querySelectorAll('#quorum .member')].map((m) => m.innerText.replace(/\\s+/g, ' ').trim())")
        .await
        .unwrap();
    let quorum: Vec<&str> = quorum
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert_eq!(quorum.len(), 3, "quorum members shown: {quorum:?}");
    assert!(
        quorum.iter().all(|m| m.contains(" up")) && quorum.iter().any(|m| m.contains("witness")),
        "quorum shown: {quorum:?}"
    );
    browser.screenshot("02-dashboard").await;

    // The wizard shows the API's validation error where the admin typed.
    browser.goto(&format!("{url}#/create")).await;
    browser
        .wait_for(
            "the create wizard",
            "!!document.getElementById('c-name')",
            PAGE_TIMEOUT,
        )
        .await;
    let guest = tiny_guest("web1");
    browser.fill("c-name", "no spaces allowed").await;
    browser.fill("c-mode", "PROTECTION_MODE_FT").await;
    browser.fill("c-vcpus", &guest.vcpus.to_string()).await;
    browser
        .fill("c-memory", &guest.memory_mib.to_string())
        .await;
    browser
        .fill("c-disk", &(guest.disks[0].size_bytes >> 20).to_string())
        .await;
    browser.fill("c-network", "business").await;
    browser.fill("c-boot", "kernel:tiny").await;
    browser.click("#c-submit").await;
    let invalid = browser
        .wait_for(
            "the wizard's error",
            "document.getElementById('c-error').textContent",
            PAGE_TIMEOUT,
        )
        .await;
    assert!(
        invalid.as_str().unwrap_or_default().contains("name"),
        "the wizard showed {invalid}"
    );
    browser.screenshot("03-wizard-error").await;

    browser.fill("c-name", "web1").await;
    browser.click("#c-submit").await;
    browser
        .wait_for(
            "the new VM's page",
            "location.hash === '#/vm/web1'",
            PAGE_TIMEOUT,
        )
        .await;
    browser.click("button[data-action=StartVm]").await;
    browser
        .wait_for("COUNTER lines in the serial console", "((document.querySelector('#serial .xterm-rows') || {}).innerText || '').includes('COUNTER ')", GUEST_BOOT_TIMEOUT)
        .await;
    let vm = lab
        .wait_vm("web1", "protected", SYNC_TIMEOUT, protected)
        .await;
    let host = vm.node.clone();
    let peer = other(&host);
    browser
        .wait_for(
            "FT protected on the VM page",
            "document.getElementById('vm-protection').textContent === 'PROTECTED'",
            DASHBOARD_LAG,
        )
        .await;
    let pauses = browser
        .wait_for(
            "checkpoint pauses in the VM page's histogram",
            "[...document.querySelectorAll('#ft-pauses tr td:last-child')].reduce((n, td) => n + Number(td.textContent), 0)",
            DASHBOARD_LAG,
        )
        .await;
    eprintln!("the console's pause histogram counts {pauses} checkpoints");
    let before = shown_counters(&mut browser).await;
    let (last_before, boot) = before.last().cloned().expect("COUNTER lines shown");
    browser.screenshot("04-vm-serial-console").await;

    // The VM's host loses power; the dashboard follows the API within DASHBOARD_LAG.
    browser.goto(&url).await;
    browser
        .wait_for("the dashboard", &both_up, PAGE_TIMEOUT)
        .await;
    lab.kill_host(&host);
    let lost = api_sees(
        &lab,
        &format!("{host} lost"),
        FAILOVER_TIMEOUT,
        |nodes, _| {
            nodes.iter().any(|n| {
                n.name == host && matches!(n.state(), pb::NodeState::Lost | pb::NodeState::Fenced)
            })
        },
        "web1",
    )
    .await;
    browser
        .wait_for(
            &format!("{host} lost on the dashboard"),
            &format!("['LOST', 'FENCED'].includes({})", host_state_script(&host)),
            DASHBOARD_LAG.saturating_sub(lost.elapsed()),
        )
        .await;
    let failed_over = api_sees(
        &lab,
        "the failover done",
        FAILOVER_TIMEOUT,
        |_, vm| {
            vm.node == peer
                && vm
                    .protection
                    .as_ref()
                    .and_then(|p| p.last_failover.as_ref())
                    .is_some_and(|f| f.running_unix_ms > 0)
        },
        "web1",
    )
    .await;
    let running_on = format!("running on {peer}");
    browser
        .wait_for(
            "the failover event on the dashboard",
            &format!(
                "document.getElementById('recent-events').innerText.includes({})",
                serde_json::json!(running_on)
            ),
            DASHBOARD_LAG.saturating_sub(failed_over.elapsed()),
        )
        .await;
    browser.screenshot("05-dashboard-after-failover").await;

    // The guest counts on, same boot, in the console's serial view.
    browser.goto(&format!("{url}#/vm/web1")).await;
    let counted_on = format!(
        "(() => {{ const t = (document.querySelector('#serial .xterm-rows') || {{}}).innerText || ''; \
         return t.split('\\n').some((l) => {{ const m = /^COUNTER (\\d+) boot=(\\S+)/.exec(l.trim()); \
         return m && Number(m[1]) > {last_before} && m[2] === {boot}; }}); }})()",
        boot = serde_json::json!(boot),
    );
    browser
        .wait_for(
            "the guest counting on after the failover",
            &counted_on,
            GUEST_BOOT_TIMEOUT,
        )
        .await;
    let after = shown_counters(&mut browser).await;
    assert!(
        after.iter().all(|(_, b)| *b == boot),
        "a new boot after an FT failover: {after:?}"
    );
    browser.screenshot("06-vm-after-failover").await;

    // The lost host's alert is cleared by its ID from the event log's page: it leaves the
    // open alerts (the API's too) and stays listed as cleared while the host is away.
    browser.goto(&format!("{url}#/events")).await;
    let alert = browser
        .wait_for(
            &format!("an open alert about {host} on the events page"),
            &format!(
                "(() => {{ const row = [...document.querySelectorAll('#event-alerts-table tr[data-alert]')]\
                 .find((r) => r.dataset.alert.includes({h})); return row ? row.dataset.alert : ''; }})()",
                h = serde_json::json!(host)
            ),
            PAGE_TIMEOUT,
        )
        .await;
    let alert = alert.as_str().unwrap().to_string();
    let button = format!(
        "#event-alerts-table button[data-clear-alert={}]",
        serde_json::json!(alert)
    );
    browser.click(&button).await;
    browser
        .wait_for(
            "the cleared alert gone from the page",
            &format!(
                "![...document.querySelectorAll('#event-alerts-table tr[data-alert]')].some((r) => r.dataset.alert === {a})",
                a = serde_json::json!(alert)
            ),
            PAGE_TIMEOUT,
        )
        .await;
    browser.screenshot("07-alert-cleared").await;
    let open = tests::pvctl_json(&lab.pvctl(&["--json", "alerts"]));
    assert!(
        !open
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == alert.as_str()),
        "{alert} still open: {open}"
    );
    let all = tests::pvctl_json(&lab.pvctl(&["--json", "alerts", "--all"]));
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == alert.as_str() && a["cleared_by"] == "admin"),
        "{alert} not listed as cleared by admin: {all}"
    );

    // A read-only token sees the VM and is refused its actions, in the API's words.
    let made = tests::pvctl_json(&lab.pvctl(&[
        "--json",
        "token-create",
        "watcher",
        "--role",
        "read-only",
    ]));
    let reader = made["token"].as_str().unwrap().to_string();
    browser.click("#logout").await;
    browser.fill("login-token", &reader).await;
    browser.click("#login-button").await;
    browser
        .wait_for(
            "the read-only login",
            "document.getElementById('who').textContent.includes('read-only')",
            PAGE_TIMEOUT,
        )
        .await;
    browser.goto(&format!("{url}#/vm/web1")).await;
    browser
        .wait_for(
            "the VM page as read-only",
            "document.getElementById('vm-state').textContent === 'RUNNING'",
            PAGE_TIMEOUT,
        )
        .await;
    browser.click("button[data-action=PowerOffVm]").await;
    let denied = browser
        .wait_for(
            "the refused power-off",
            "document.getElementById('vm-error').textContent",
            PAGE_TIMEOUT,
        )
        .await;
    assert!(
        denied.as_str().unwrap_or_default().contains("read-only"),
        "a read-only power-off showed {denied}"
    );
    browser.screenshot("08-read-only-refused").await;
    let vm = lab
        .client()
        .await
        .get_vm(pb::GetVmRequest { vm: "web1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        vm.state(),
        pb::VmState::Running,
        "a read-only token powered the VM off"
    );
}
