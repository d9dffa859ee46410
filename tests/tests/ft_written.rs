//! The kernel's marks on written pages, without QEMU: a process maps a `pc.ram` file shared
//! and writes pages when asked; the agent's tracker answers every page on its first pass, then
//! exactly the pages written since, with their contents. Write-protect marks need the process
//! to preload the FT shim; soft-dirty bits need a kernel that has them.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use agent::ft::dirty::{DirtyTracker, Error, KernelMarks, PAGE};

/// Maps the file shared, says `ready`, then adds 1 to the first byte of each page number read.
const WRITER: &str = "import mmap,sys\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),0,mmap.MAP_SHARED)\nprint('ready',flush=True)\nfor l in sys.stdin:\n for p in l.split():\n  n=int(p)*4096\n  m[n]=(m[n]+1)%256\n print('ok',flush=True)\n";

struct Writer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Writer {
    fn start(ram: &Path, preload: Option<&Path>) -> Writer {
        let mut command = Command::new("python3");
        command
            .args(["-c", WRITER])
            .arg(ram)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(preload) = preload {
            command.env("LD_PRELOAD", preload);
        }
        let mut child = command.spawn().expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready");
        assert_eq!(line.trim(), "ready");
        Writer {
            child,
            stdin,
            stdout,
        }
    }

    fn write(&mut self, pages: &str) {
        writeln!(self.stdin, "{pages}").expect("ask for writes");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("ok");
        assert_eq!(line.trim(), "ok");
    }

    /// Ends the process; what it wrote to stderr.
    fn finish(self) -> String {
        drop(self.stdin);
        let output = self.child.wait_with_output().expect("writer exit");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

/// A 16-page RAM file on tmpfs, page `i` filled with byte `i`.
fn ram_file(dir: &Path) -> std::path::PathBuf {
    let ram = dir.join("pc.ram");
    let data: Vec<u8> = (0u8..16).flat_map(|i| [i; PAGE]).collect();
    std::fs::write(&ram, data).expect("write RAM file");
    ram
}

#[test]
fn the_kernel_marks_each_page_a_shim_process_writes() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs directory");
    let ram = ram_file(dir.path());
    let mut writer = Writer::start(&ram, Some(&tests::ft_shim()));
    let mut tracker = KernelMarks::written(writer.child.id(), &ram).expect("tracked mapping");
    assert_eq!(tracker.name(), "uffd-written");
    assert!(tracker.runs_with_guest());

    let first = tracker.scan().expect("first pass");
    writer.write("5 9");
    let second = tracker.scan().expect("second pass");
    let third = tracker.scan().expect("third pass");
    writer.write("9 15 0");
    let fourth = tracker.scan().expect("fourth pass");
    let stderr = writer.finish();

    assert_eq!(first.pages, (0..16).collect::<Vec<u64>>());
    assert_eq!(second.pages, vec![5, 9]);
    assert_eq!(second.page(0).1[..2], [6, 5]);
    assert_eq!(second.page(1).1[..2], [10, 9]);
    assert!(third.is_empty(), "{:?}", third.pages);
    assert_eq!(fourth.pages, vec![0, 9, 15]);
    assert_eq!(fourth.page(1).1[0], 11);
    assert!(
        stderr
            .contains("pairvisor ftshim: the kernel tracks writes to the guest RAM (65536 bytes)"),
        "{stderr}"
    );
}

#[test]
fn without_the_shim_the_mapping_is_not_tracked() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs directory");
    let ram = ram_file(dir.path());
    let writer = Writer::start(&ram, None);

    let tracker = KernelMarks::written(writer.child.id(), &ram);

    writer.finish();
    assert!(
        matches!(tracker, Err(Error::NotTracked { .. })),
        "{tracker:?}"
    );
}

/// Asserts on a kernel with soft-dirty only (elsewhere it returns early).
#[test]
fn soft_dirty_bits_answer_the_page_written() {
    if !KernelMarks::soft_dirty_available() {
        eprintln!("soft-dirty unavailable on this kernel: skipped");
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs directory");
    let ram = ram_file(dir.path());
    let mut writer = Writer::start(&ram, None);
    let mut tracker = KernelMarks::soft_dirty(writer.child.id(), &ram).expect("open");
    let first = tracker.scan().expect("first scan");
    writer.write("5");

    let second = tracker.scan();

    writer.finish();
    assert_eq!(first.pages, (0..16).collect::<Vec<u64>>());
    assert_eq!(second.expect("second scan").pages, vec![5]);
}
