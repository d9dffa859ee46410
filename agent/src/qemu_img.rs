//! Running `qemu-img`: its output on success, its arguments and error output on failure.
//! Callers always give the image's format (`-f`): qemu-img never probes a file a guest or an
//! importer wrote, since a probed header can name any host file as a backing file.

use std::ffi::OsStr;
use std::path::Path;

use tokio::process::Command;

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
    let mut command = Command::new("qemu-img");
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

/// Runs `qemu-img ARGS` and reads its JSON output as a `T`.
pub async fn json<T: serde::de::DeserializeOwned, S: AsRef<OsStr>>(
    args: &[S],
) -> Result<T, Failed> {
    let out = run(args, None).await?;
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
pub async fn measure(source: &Path, format: &str, target: &str) -> Result<u64, Failed> {
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
    let measured: Measured = json::<Measured, &OsStr>(&args).await?;
    Ok(measured.required + measured.required / 100)
}
