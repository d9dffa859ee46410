//! Preloaded into an FT guest's QEMU (`LD_PRELOAD`, set by the agent's domain XML): when QEMU
//! maps the guest RAM file (`pc.ram`, shared), the mapping is registered with a userfaultfd in
//! asynchronous write-protect mode. The kernel then marks every page QEMU or the guest writes,
//! resolving the faults itself (QEMU never sees one), and the agent reads and re-arms those
//! marks with `PAGEMAP_SCAN` on /proc/PID/pagemap (`agent/src/ft/dirty/kernel.rs`) instead of
//! hashing all of guest RAM every epoch: soft-dirty tracking for kernels without it.
//!
//! Nothing else changes. When anything fails (an old kernel, no userfaultfd), the mapping is
//! left as it was, one line on QEMU's stderr says why, and the agent hashes pages instead.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// The file name of the guest RAM file libvirt gives QEMU's memory backend.
const RAM_FILE: &[u8] = b"/pc.ram";

/// `userfaultfd(2)` flag: only faults from user mode are handled (no privilege needed; the
/// asynchronous write-protect faults of kernel-mode writes are resolved all the same).
const UFFD_USER_MODE_ONLY: c_int = 1;
/// The userfaultfd API version.
const UFFD_API: u64 = 0xaa;
/// Write protection on shmem (the RAM file lives on tmpfs).
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Pages never touched yet are protected too.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself and marks the page written.
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOWR(0xaa, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// Register for write-protect tracking.
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
/// Protect the range.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

/// `mmap`'s signature.
type MmapFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;

/// libc's `mmap`, looked up once (0 until then).
static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
/// The userfaultfd every tracked mapping is registered with (-1 until the first).
static UFFD: AtomicI32 = AtomicI32::new(-1);

/// QEMU maps guest RAM with `mmap64` (as do all programs built with 64-bit file offsets,
/// Debian's QEMU among them): mapped as asked, then registered when it is the RAM file's.
///
/// # Safety
/// As `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    let mapped = match real_mmap() {
        // SAFETY: libc's mmap64 with the caller's own arguments.
        Some(mmap) => unsafe { mmap(addr, len, prot, flags, fd, offset) },
        // SAFETY: the mmap system call with the caller's own arguments (should the dynamic
        // linker not find libc's).
        None => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) as *mut c_void
        },
    };
    // Anonymous mappings (malloc's among them) return here, before anything that allocates.
    if mapped != libc::MAP_FAILED && fd >= 0 && flags & libc::MAP_SHARED != 0 && is_ram_file(fd) {
        if let Err((what, error)) = track(mapped, len) {
            eprintln!(
                "pairvisor ftshim: {what} failed ({error}): guest RAM writes are not tracked; the agent hashes pages instead"
            );
        } else {
            eprintln!("pairvisor ftshim: the kernel tracks writes to the guest RAM ({len} bytes)");
        }
    }
    mapped
}

/// libc's `mmap64` (the next definition after this library), if the dynamic linker finds it.
fn real_mmap() -> Option<MmapFn> {
    let mut found = REAL_MMAP.load(Ordering::Acquire);
    if found == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT skips this library.
        found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mmap64".as_ptr()) } as usize;
        REAL_MMAP.store(found, Ordering::Release);
    }
    // SAFETY: a non-null `found` is libc's mmap64, of type MmapFn.
    (found != 0).then(|| unsafe { std::mem::transmute::<usize, MmapFn>(found) })
}

/// Whether `fd` is the guest RAM file: its path ends in `/pc.ram`. Reads the link into a
/// stack buffer (no allocation inside mmap).
fn is_ram_file(fd: c_int) -> bool {
    let mut link = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    link[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut rest = fd.unsigned_abs();
    let mut count = 0;
    while count == 0 || rest > 0 {
        // A decimal digit: the cast cannot truncate.
        digits[count] = b'0' + (rest % 10) as u8;
        rest /= 10;
        count += 1;
    }
    for (at, digit) in digits[..count].iter().rev().enumerate() {
        link[prefix.len() + at] = *digit;
    }
    let Ok(link) = CStr::from_bytes_until_nul(&link) else {
        return false;
    };
    let mut path = [0u8; 4096];
    // SAFETY: a NUL-terminated link name and a buffer of the length given.
    let len = unsafe { libc::readlink(link.as_ptr(), path.as_mut_ptr().cast(), path.len()) };
    usize::try_from(len)
        .ok()
        .and_then(|len| path.get(..len))
        .is_some_and(|path| path.ends_with(RAM_FILE))
}

/// Registers `len` bytes at `start` for asynchronous write protection and protects them all;
/// on failure, the step that failed and why.
fn track(start: *mut c_void, len: usize) -> Result<(), (&'static str, std::io::Error)> {
    let uffd = uffd()?;
    let range = (start as u64, len as u64);
    let mut register = UffdioRegister {
        start: range.0,
        len: range.1,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes one struct uffdio_register we own.
    if unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, &mut register) } != 0 {
        return Err(failed("registering the guest RAM with the userfaultfd"));
    }
    let mut protect = UffdioWriteprotect {
        start: range.0,
        len: range.1,
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: the ioctl reads one struct uffdio_writeprotect we own.
    if unsafe { libc::ioctl(uffd, UFFDIO_WRITEPROTECT, &mut protect) } != 0 {
        return Err(failed("write-protecting the guest RAM"));
    }
    Ok(())
}

/// The process's userfaultfd in asynchronous write-protect mode, opened on first use and kept
/// open for QEMU's lifetime (closing it would end the tracking).
fn uffd() -> Result<c_int, (&'static str, std::io::Error)> {
    let open = UFFD.load(Ordering::Acquire);
    if open >= 0 {
        return Ok(open);
    }
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: the userfaultfd system call takes only flags.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    let fd = c_int::try_from(fd).unwrap_or(-1);
    if fd < 0 {
        return Err(failed("opening a userfaultfd"));
    }
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ioctls: 0,
    };
    // SAFETY: the ioctl reads and writes one struct uffdio_api we own.
    if unsafe { libc::ioctl(fd, UFFDIO_API, &mut api) } != 0 {
        let error = failed("enabling asynchronous write protection (Linux 6.7 or later)");
        // SAFETY: closing the descriptor we just opened and share with no one.
        unsafe { libc::close(fd) };
        return Err(error);
    }
    UFFD.store(fd, Ordering::Release);
    Ok(fd)
}

/// The step that failed, with errno as the system call left it.
fn failed(what: &'static str) -> (&'static str, std::io::Error) {
    (what, std::io::Error::last_os_error())
}
