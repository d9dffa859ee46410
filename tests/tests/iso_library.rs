//! End to end in the lab: the ISO library. An ISO uploaded with `pvctl iso-add` lands on both
//! hosts intact, a VM created from it boots from the CD (GRUB shows on its serial console),
//! a host path is refused, a broken upload leaves nothing, and an ISO in use cannot go. Its
//! screen is not blank, saved by `pvctl vm-screenshot` and shown on the console's VM page.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::browser::Browser;
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_json, pvctl_ok, pvctl_refused, sha256sum};

/// The Debian `grub-rescue-pc` package's ISO (`scripts/install-deps.sh` installs it).
const RESCUE_ISO: &str = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso";
/// How long the console may take to load and show a screen, on a busy machine.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The distinct colours of the console's live VNC view (noVNC's canvas) once it is connected
/// and at least 320x200 (0 before).
const SCREEN_COLOURS: &str = "(() => { const v = document.getElementById('vnc'); \
    if (!v || !v.dataset.connected) return 0; const c = v.querySelector('canvas'); \
    if (!c || c.width < 320 || c.height < 200) return 0; \
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const seen = new Set(); \
    for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); \
    return seen.size >= 2 ? seen.size : 0; })()";
/// Time for a failed upload's copies and record to be removed.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The ISO directory of storage group sg0 on `node`.
/// How many different pixels a PNG has (1: blank).
fn distinct_colours(png: &Path) -> usize {
    let file = std::fs::File::open(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", png.display()));
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let bytes_per_pixel = frame.color_type.samples() * usize::from(frame.bit_depth as u8) / 8;
    assert!(frame.width >= 320 && frame.height >= 200, "{frame:?}");
    let pixels = &pixels[..frame.buffer_size()];
    let mut seen: Vec<&[u8]> = pixels.chunks(bytes_per_pixel.max(1)).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

fn iso_dir(lab: &Lab, node: &str) -> PathBuf {
    lab.volume_path(node, "x").with_file_name(".isos")
}

/// Every file in `node`'s ISO directory, sorted.
fn iso_files(lab: &Lab, node: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(iso_dir(lab, node))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn library(lab: &Lab) -> Vec<String> {
    pvctl_json(&lab.pvctl(&["--json", "iso-list"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

/// Uploads `data` as `name` through the API, announcing `size_bytes` and `sha256`.
async fn upload(
    api: &mut tests::Client,
    name: &str,
    size_bytes: u64,
    data: Vec<u8>,
    sha256: &str,
) -> tonic::Status {
    let parts = vec![
        pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Header(pb::IsoHeader {
                name: name.into(),
                storage_group: String::new(),
                size_bytes,
            })),
        },
        pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Data(data)),
        },
        pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Sha256(sha256.into())),
        },
    ];
    api.add_iso(tokio_stream::iter(parts))
        .await
        .expect_err("the broken upload was accepted")
}

/// Waits until `name` is gone from the library and from both hosts' ISO directories.
fn wait_gone(lab: &Lab, name: &str) {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        let listed = library(lab).contains(&name.to_string());
        let files: Vec<String> = ["n0", "n1"]
            .iter()
            .flat_map(|n| iso_files(lab, n))
            .collect();
        let left = files.iter().any(|f| f.contains(name));
        if !listed && !left {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still there after {CLEANUP_TIMEOUT:?}: listed {listed}, files {files:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iso_library_boots_a_vm_from_an_uploaded_cd_and_refuses_host_paths() {
    if tests::skip() {
        return;
    }
    let iso = Path::new(RESCUE_ISO);
    assert!(
        iso.is_file(),
        "{RESCUE_ISO} is missing: install the grub-rescue-pc package (scripts/install-deps.sh)"
    );
    let lab = Lab::up("pvtv", 240);

    // Upload: both hosts hold a byte-identical copy; the checksum is the file's.
    let added = pvctl_json(&lab.pvctl(&["--json", "iso-add", RESCUE_ISO, "--name", "rescue.iso"]));
    let sha = sha256sum(iso);
    assert_eq!(added["sha256"], sha.as_str());
    assert_eq!(added["state"], "ready");
    for node in ["n0", "n1"] {
        assert_eq!(iso_files(&lab, node), ["rescue.iso"], "on {node}");
        assert_eq!(sha256sum(&iso_dir(&lab, node).join("rescue.iso")), sha);
    }
    let err = pvctl_refused(&lab.pvctl(&["iso-add", RESCUE_ISO, "--name", "rescue.iso"]));
    assert!(err.contains("has an ISO named rescue.iso already"), "{err}");

    // Broken uploads are refused and leave nothing, on either host or in the library.
    let mut api = lab.client().await;
    let bytes = std::fs::read(iso).unwrap();
    let half = bytes[..bytes.len() / 2].to_vec();
    let wrong = upload(&mut api, "bad.iso", half.len() as u64, half.clone(), &sha).await;
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument, "{wrong}");
    assert!(wrong.message().contains("checksum mismatch"), "{wrong}");
    wait_gone(&lab, "bad.iso");
    let short = upload(&mut api, "short.iso", bytes.len() as u64, half, &sha).await;
    assert!(short.message().contains("ended after"), "{short}");
    wait_gone(&lab, "short.iso");

    // A host path is refused: a guest is never given an arbitrary host file.
    let path = pvctl_refused(&lab.pvctl(&[
        "vm-create",
        "pathvm",
        "--mode",
        "unprotected",
        "--disk",
        "16M",
        "--iso",
        RESCUE_ISO,
    ]));
    assert!(path.contains("is a path"), "{path}");
    let unknown = pvctl_refused(&lab.pvctl(&[
        "vm-create",
        "nonevm",
        "--mode",
        "unprotected",
        "--disk",
        "16M",
        "--iso",
        "none.iso",
    ]));
    assert!(unknown.contains("no ISO named none.iso"), "{unknown}");

    // A VM created from the library boots from the CD: GRUB's menu shows on its console.
    let created = pvctl_json(&lab.pvctl(&[
        "--json",
        "vm-create",
        "cdvm",
        "--mode",
        "ha",
        "--disk",
        "16M",
        "--iso",
        "rescue.iso",
    ]));
    assert_eq!(created["boot"]["iso"], "rescue.iso");
    let vm = api
        .get_vm(pb::GetVmRequest { vm: "cdvm".into() })
        .await
        .unwrap()
        .into_inner();
    let console = Console::from_start(&lab, &vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "cdvm"]));
    console.wait_line("the CD's GRUB", GUEST_BOOT_TIMEOUT, |l| {
        l.contains("GNU GRUB")
    });
    // Its screen can be saved: a PNG that is not blank (the firmware and GRUB wrote on it).
    let shot = lab.dir().join("cdvm.png");
    pvctl_ok(&lab.pvctl(&["vm-screenshot", "cdvm", shot.to_str().unwrap()]));
    let colours = distinct_colours(&shot);
    assert!(colours >= 2, "the screenshot {} is blank", shot.display());
    // And the browser console shows it live on the VM's page (noVNC over the API port's
    // websocket, relayed by the agent from QEMU's VNC socket).
    let artefacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    let mut browser = Browser::launch(&artefacts).await;
    let system_ip = lab.endpoints().split(',').next().unwrap().to_string();
    let token = std::fs::read_to_string(lab.admin_token()).unwrap();
    let url = format!("https://{system_ip}/");
    browser.log_in(&url, &token, PAGE_TIMEOUT).await;
    browser.goto(&format!("{url}#/vm/cdvm")).await;
    let shown = browser
        .wait_for("the VM's screen on its page", SCREEN_COLOURS, PAGE_TIMEOUT)
        .await;
    assert!(
        shown.as_u64().unwrap_or_default() >= 2,
        "the console's screen view is blank ({shown} colours)"
    );
    let _ = browser
        .eval("document.getElementById('vnc').scrollIntoView()")
        .await;
    // Keys typed into the view reach the guest: GRUB leaves its menu for its command line
    // and runs the command typed there (GRUB draws on the serial console too).
    let focused = browser
        .eval("(() => { const c = document.querySelector('#vnc canvas'); c.focus(); return document.activeElement === c; })()")
        .await;
    assert_eq!(
        focused,
        Ok(serde_json::json!(true)),
        "focusing the VNC view"
    );
    browser.press_keys("c").await;
    console.wait_line("GRUB's command line", PAGE_TIMEOUT, |l| {
        l.contains("Minimal BASH-like line editing")
    });
    browser.press_keys("echo typed over vnc\n").await;
    console.wait_line(
        "GRUB's answer to keys typed in the console",
        PAGE_TIMEOUT,
        |l| l.contains("typed over vnc") && !l.contains("echo"),
    );
    browser.screenshot("iso-vm-screen").await;
    drop(browser);
    let listed = pvctl_json(&lab.pvctl(&["--json", "iso-list"]));
    assert_eq!(listed[0]["used_by"][0], "cdvm");

    // In use: the ISO stays. Once the VM is gone it can be deleted from both hosts.
    let busy = pvctl_refused(&lab.pvctl(&["iso-delete", "rescue.iso"]));
    assert!(busy.contains("in use by VM cdvm"), "{busy}");
    assert_eq!(iso_files(&lab, "n0"), ["rescue.iso"]);
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "cdvm"]));
    pvctl_ok(&lab.pvctl(&["vm-delete", "cdvm"]));
    pvctl_ok(&lab.pvctl(&["iso-delete", "rescue.iso"]));
    assert!(library(&lab).is_empty());
    for node in ["n0", "n1"] {
        assert!(iso_files(&lab, node).is_empty(), "on {node}");
    }
}
