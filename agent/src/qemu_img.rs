//! Running `qemu-img`: its output on success, its arguments and error output on failure.
//! Callers always give the image's format (`-f`): qemu-img never probes a file a guest or an
//! importer wrote, since a probed header can name any host file as a backing file.

use std::ffi::OsStr;
use std::path::Path;

use tokio::process::Command;

/// Whose image qemu-img reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// One this host made (a volume, a snapshot): no limits.
    Own,
    /// One from outside (an import): a crafted image's metadata can make qemu-img take huge
    /// memory and CPU time (CVE-2015-5162), so it runs under `prlimit` with 1 GiB of address
    /// space and 30 s of CPU, as OpenStack's Nova runs `qemu-img info`.
    Untrusted,
}

/// `prlimit`'s limits for [`Trust::Untrusted`].
const UNTRUSTED_LIMITS: [&str; 2] = ["--as=1073741824", "--cpu=30"];

/// `qemu-img` failed or could not run.
#[derive(Debug, thiserror::Error)]
#[error("qemu-img {args}: {reason}")]
pub struct Failed {
    /// Its arguments.
    pub args: String,
    /// Its error output, or why it could not run or be read.
    pub reason: String,
}

/// Runs `qemu-img ARGS` (in `dir` if given); its standard output. A dropped call kills it.
pub async fn run<S: AsRef<OsStr>>(args: &[S], dir: Option<&Path>) -> Result<Vec<u8>, Failed> {
    output(args, dir, Trust::Own).await
}

async fn output<S: AsRef<OsStr>>(
    args: &[S],
    dir: Option<&Path>,
    trust: Trust,
) -> Result<Vec<u8>, Failed> {
    let mut command = match trust {
        Trust::Own => Command::new("qemu-img"),
        Trust::Untrusted => {
            let mut command = Command::new("prlimit");
            command.args(UNTRUSTED_LIMITS).arg("qemu-img");
            command
        }
    };
    command.args(args).kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let failed = |reason: String| Failed {
        args: args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        reason,
    };
    let output = command
        .output()
        .await
        .map_err(|e| failed(format!("could not run: {e}")))?;
    if !output.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(output.stdout)
}

/// Runs `qemu-img ARGS` on an image of `trust` and reads its JSON output as a `T`.
pub async fn json<T: serde::de::DeserializeOwned, S: AsRef<OsStr>>(
    args: &[S],
    trust: Trust,
) -> Result<T, Failed> {
    let out = output(args, None, trust).await?;
    serde_json::from_slice(&out).map_err(|e| Failed {
        args: args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        reason: format!("unreadable output: {e}"),
    })
}

/// Bytes `source` of `format` (with its backing chain) would take converted to `target`,
/// plus 1 % for the file system's own blocks.
pub async fn measure(
    source: &Path,
    format: &str,
    target: &str,
    trust: Trust,
) -> Result<u64, Failed> {
    #[derive(serde::Deserialize)]
    struct Measured {
        required: u64,
    }
    let args = [
        "measure".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "-O".as_ref(),
        target.as_ref(),
        "--output=json".as_ref(),
        source.as_os_str(),
    ];
    let measured: Measured = json::<Measured, &OsStr>(&args, trust).await?;
    Ok(measured.required + measured.required / 100)
}
