//! A read-only shared mapping of a guest RAM file, so that [`PageHashes`](super::PageHashes)
//! hashes the pages where they lie instead of copying the whole file out with reads.
//!
//! Three caveats, each harmless for how the mapping is used:
//!
//! * **Pages change under the mapping.** QEMU (the guest) writes the file through its own
//!   mapping while a pre-copy pass runs with the guest running, so a page may be torn: half
//!   old, half new. A torn page only gives a hash that decides whether to copy the page; the
//!   hash kept is that of the copy, the bytes the standby gets. The paused pass, with the guest
//!   stopped, compares every page with those hashes, so no change is missed. Readers never
//!   assume that two reads of a byte agree.
//! * **A truncated file faults.** Touching a mapped page past the end of the file raises
//!   SIGBUS, which kills the agent. QEMU never shrinks its RAM file while it runs, and every
//!   scan first checks that the file is not shorter than the mapping (`check_size`), which
//!   turns a restarted, smaller guest into [`Error::RamShrank`](super::Error::RamShrank).
//! * **Reading allocates on tmpfs.** A read fault on a hole of a tmpfs file allocates the page
//!   (a positional read does not), so passes read only the pages that hold data (`holes`) and
//!   the file stays as sparse as the guest left it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};

/// A read-only `MAP_SHARED` mapping of the first `len` bytes of a file, unmapped on drop.
#[derive(Debug)]
pub(super) struct RamMap {
    /// The first mapped byte.
    ptr: NonNull<u8>,
    /// Mapped bytes, positive.
    len: usize,
}

impl RamMap {
    /// Maps the first `len` bytes of `file` (open for reading) read-only and shared; the
    /// mapping stays valid after `file` is closed.
    #[allow(unsafe_code)]
    pub(super) fn new(file: &File, len: usize) -> io::Result<RamMap> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map zero bytes",
            ));
        }
        // SAFETY: a null hint without MAP_FIXED makes the kernel choose unused addresses, so
        // the new mapping replaces no memory of this process. The descriptor is valid for the
        // call (borrowed from `file`), and the kernel keeps its own reference to the file for
        // the life of the mapping. MAP_FAILED is checked below.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned address 0"))?;
        Ok(RamMap { ptr, len })
    }

    /// The mapped bytes. They may change while borrowed (module doc): read each one at most
    /// once per decision.
    #[allow(unsafe_code)]
    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is one readable mapping that `self` owns and only `drop`
        // unmaps, so it outlives the borrow of `self`; mmap accepted `len`, so it fits the
        // address space (at most isize::MAX). Every page is backed while the file is not
        // shorter than `len`: callers check the size before each pass and QEMU never shrinks
        // the file (module doc). Other processes may write the bytes while the slice lives;
        // any u8 value is valid, and callers never rely on two reads agreeing (module doc).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for RamMap {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly the mapping made in `new`, unmapped only here,
        // and no slice from `bytes` outlives `&self`, so nothing refers to it any more.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of an owned mapping failed");
    }
}

#[allow(unsafe_code)]
// SAFETY: `RamMap` owns its mapping outright (no thread-local state); a mapping is valid in
// every thread of the process, and munmap may run on any of them.
unsafe impl Send for RamMap {}

#[allow(unsafe_code)]
// SAFETY: `&RamMap` gives only read access (`bytes`) to read-only memory, which any number of
// threads may read at once.
unsafe impl Sync for RamMap {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::PAGE;
    use super::super::tests::{contents, ram_file, write_page};
    use super::*;

    #[test]
    fn ram_map_new_maps_file_contents() {
        let ram = ram_file(4);

        let map = RamMap::new(ram.as_file(), 4 * PAGE).expect("map");

        assert_eq!(map.bytes(), contents(&ram).as_slice());
    }

    #[test]
    fn ram_map_write_through_file_after_mapping_is_seen() {
        let ram = ram_file(4);
        let map = RamMap::new(ram.as_file(), 4 * PAGE).expect("map");

        write_page(&ram, 2, 0xab);

        assert_eq!(&map.bytes()[2 * PAGE..3 * PAGE], &[0xab; PAGE][..]);
    }

    #[test]
    fn ram_map_shorter_than_file_maps_prefix() {
        let ram = ram_file(4);
        ram.as_file().write_all_at(b"q", 0).expect("write");

        let map = RamMap::new(ram.as_file(), PAGE).expect("map");

        assert_eq!((map.bytes().len(), map.bytes()[0]), (PAGE, b'q'));
    }

    #[test]
    fn ram_map_zero_length_fails() {
        let ram = ram_file(1);

        let result = RamMap::new(ram.as_file(), 0);

        assert_eq!(
            result.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::InvalidInput)
        );
    }
}
