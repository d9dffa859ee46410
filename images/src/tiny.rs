//! The tiny test guest: a Debian kernel and a busybox initramfs whose `/init` keeps a counter
//! on its first disk and, when it has a second disk, runs a write bench there (`BENCH` lines
//! for `ha-bench`; see `images/tiny-guest/init`).
//!
//! The build runs once into a cache directory and again only when one of its inputs changes:
//! the scripts embedded here, [`TINY_GUEST_VERSION`], or the Debian candidate versions of the
//! kernel and busybox packages. The inputs are stored next to the image and compared verbatim.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BootImage, CMDLINE_FILE, Error, remove_dir_if_exists, replace_dir};

/// Name under which the tiny guest is installed in a host's image library.
pub const TINY_GUEST_NAME: &str = "tiny";

/// Version of the tiny guest; bump it to force a rebuild when the build changes in a way
/// the embedded scripts do not show.
pub const TINY_GUEST_VERSION: u32 = 2;

const BUILD_SH: &str = include_str!("../tiny-guest/build.sh");
const INIT: &str = include_str!("../tiny-guest/init");
const POWER_BUTTON: &str = include_str!("../tiny-guest/power-button");
const CMDLINE: &str = "console=ttyS0 quiet panic=-1";
const INPUTS_FILE: &str = "inputs.txt";
const PACKAGES: [&str; 2] = ["linux-image-amd64", "busybox-static"];

/// TCP port of the guest's counter service (`nc -ll` in `init`): each line a client sends is
/// answered with `COUNTER n boot=<id>`, the counter's last value acknowledged by the disk.
pub const COUNTER_PORT: u16 = 7000;

/// The IPv4 address the tiny guest gives a NIC with MAC `mac` ("52:54:00:0a:0b:0c" →
/// 10.10.11.12, prefix /8), as `init` derives it; `None` if `mac` is not six hex bytes.
pub fn guest_ip(mac: &str) -> Option<Ipv4Addr> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    match bytes[..] {
        [_, _, _, a, b, c] => Some(Ipv4Addr::new(10, a, b, c)),
        _ => None,
    }
}

/// Returns the tiny guest's image directory under `cache_dir`, building it first if it is
/// missing or any of its inputs changed.
pub fn ensure_tiny_guest(cache_dir: &Path) -> Result<PathBuf, Error> {
    let dir = cache_dir.join(TINY_GUEST_NAME);
    let inputs = inputs();
    let stamp = dir.join(INPUTS_FILE);
    if fs::read_to_string(&stamp).is_ok_and(|s| s == inputs) && BootImage::open(&dir).is_ok() {
        tracing::debug!(dir = %dir.display(), "tiny guest up to date");
        return Ok(dir);
    }
    tracing::info!(dir = %dir.display(), "building tiny guest: begin");
    let tmp = cache_dir.join(format!("{TINY_GUEST_NAME}.build.{}", std::process::id()));
    let result = build_into(&tmp, &inputs).and_then(|()| replace_dir(&tmp, &dir));
    if result.is_err() {
        // Best effort: the original error is what the caller needs to see.
        let _ = remove_dir_if_exists(&tmp);
    }
    tracing::info!(dir = %dir.display(), ok = result.is_ok(), "building tiny guest: end");
    result.map(|()| dir)
}

/// Runs the build script into `out` and writes the command line and the inputs stamp.
fn build_into(out: &Path, inputs: &str) -> Result<(), Error> {
    remove_dir_if_exists(out)?;
    let src = out.join("src");
    fs::create_dir_all(&src).map_err(Error::io("creating", &src))?;
    for (name, text) in [
        ("build.sh", BUILD_SH),
        ("init", INIT),
        ("power-button", POWER_BUTTON),
    ] {
        let path = src.join(name);
        fs::write(&path, text).map_err(Error::io("writing", &path))?;
    }
    let status = Command::new("bash")
        .arg(src.join("build.sh"))
        .arg(out)
        .arg(src.join("init"))
        .arg(src.join("power-button"))
        .status()
        .map_err(Error::io("running the build script in", &src))?;
    if !status.success() {
        return Err(Error::Build {
            name: TINY_GUEST_NAME.to_string(),
            dir: out.to_path_buf(),
            status: status.to_string(),
        });
    }
    remove_dir_if_exists(&src)?;
    let cmdline = out.join(CMDLINE_FILE);
    fs::write(&cmdline, format!("{CMDLINE}\n")).map_err(Error::io("writing", &cmdline))?;
    let stamp = out.join(INPUTS_FILE);
    fs::write(&stamp, inputs).map_err(Error::io("writing", &stamp))
}

/// Everything the build depends on, as text: a change anywhere means a rebuild.
fn inputs() -> String {
    format!(
        "version {TINY_GUEST_VERSION}\ncmdline {CMDLINE}\n{}\n--- build.sh\n{BUILD_SH}\n--- init\n{INIT}\n--- power-button\n{POWER_BUTTON}",
        candidate_versions()
    )
}

/// The Debian candidate versions of the packages the build downloads ("unknown" without apt).
fn candidate_versions() -> String {
    let output = Command::new("apt-cache")
        .arg("policy")
        .args(PACKAGES)
        .output();
    let text = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return "packages unknown".to_string(),
    };
    parse_candidates(&text)
}

/// Extracts `package candidate` lines from `apt-cache policy` output.
fn parse_candidates(policy: &str) -> String {
    let mut lines = Vec::new();
    let mut package = "";
    for line in policy.lines() {
        if let Some(name) = line.strip_suffix(':').filter(|_| !line.starts_with(' ')) {
            package = name;
        } else if let Some(version) = line.trim().strip_prefix("Candidate:") {
            lines.push(format!("{package} {}", version.trim()));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_candidates_policy_output_lists_each_package() {
        let policy = "linux-image-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n     6.1.192-2 500\nbusybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4\n";

        let parsed = parse_candidates(policy);

        assert_eq!(
            parsed,
            "linux-image-amd64 6.1.192-2\nbusybox-static 1:1.35.0-4"
        );
    }

    #[test]
    fn guest_ip_takes_the_last_three_mac_bytes() {
        assert_eq!(
            guest_ip("52:54:00:0a:ff:01"),
            Some(Ipv4Addr::new(10, 10, 255, 1))
        );
        assert_eq!(guest_ip("52:54:00:0a:ff"), None);
        assert_eq!(guest_ip("52:54:00:0a:ff:zz"), None);
    }

    #[test]
    fn inputs_embed_the_init_script() {
        let text = inputs();

        assert!(text.contains("COUNTER $n boot=$BOOTID"));
    }

    #[test]
    fn inputs_embed_the_write_bench() {
        let text = inputs();

        assert!(text.contains("BENCH round=$k writes=$BENCH_WRITES"));
    }
}
