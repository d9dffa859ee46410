//! `lseek(SEEK_DATA/SEEK_HOLE)`: where a sparse file's data and holes are, so readers skip
//! holes (which read as zeros) instead of reading them: FT's page hashes and exports.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `lseek(fd, offset, whence)`: the offset found, or `None` when SEEK_DATA finds no data at
/// or after `offset` (ENXIO).
#[allow(unsafe_code)]
pub fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    // SAFETY: lseek only reads the descriptor, which `file` keeps open for the call; it
    // touches no memory of this process.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found >= 0 {
        return Ok(u64::try_from(found).ok());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(error)
    }
}

/// The first offset at or after `offset` that holds data, or `None` when only holes follow.
pub fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}
