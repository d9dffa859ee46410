//! The `PAGEMAP_SCAN` ioctl on /proc/PID/pagemap (Linux 6.7): which pages of a range of
//! another process were written since they were last write-protected, re-protected in the same
//! step. It needs the range registered with a userfaultfd in asynchronous write-protect mode,
//! which `ftshim` does inside QEMU.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Write-protect the pages reported.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) unless the whole range is registered for asynchronous write protection.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// The page was written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Regions asked for per call.
const REGIONS_PER_CALL: usize = 4096;

/// `struct page_region`: a run of pages `[start, end)` sharing `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// Address after the last page.
    pub end: u64,
    /// The categories the run matched.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Appends to `regions` the written runs of `[start, end)` in `pagemap`'s process and, when
/// `rearm`, write-protects them again, so that the next call answers only later writes. Fails
/// with EPERM when the range is not registered for asynchronous write protection, and with
/// ENOTTY or EINVAL on kernels without the ioctl.
pub fn written(
    pagemap: &File,
    start: u64,
    end: u64,
    rearm: bool,
    regions: &mut Vec<PageRegion>,
) -> io::Result<()> {
    let mut buffer = vec![PageRegion::default(); REGIONS_PER_CALL];
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_CHECK_WPASYNC | if rearm { PM_SCAN_WP_MATCHING } else { 0 },
            start: from,
            end,
            vec: buffer.as_mut_ptr() as u64,
            vec_len: buffer.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a pm_scan_arg of the size it states, and `vec`/`vec_len` describe
        // `buffer`, which outlives the call; the kernel writes at most `vec_len` regions.
        let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        let found = usize::try_from(found).map_err(|_| io::Error::last_os_error())?;
        regions.extend_from_slice(buffer.get(..found).unwrap_or(&buffer));
        if arg.walk_end <= from {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN made no progress at {from:#x}"
            )));
        }
        from = arg.walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        // _IOWR('f', 16, 96 bytes): direction 3, size 96, type 'f', number 16.
        assert_eq!(PAGEMAP_SCAN, (3 << 30) | (96 << 16) | (0x66 << 8) | 16);
    }

    #[test]
    fn an_unregistered_range_is_refused() {
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let page = vec![1u8; 4096 * 4];
        let start = page.as_ptr() as u64 & !4095;

        let error = written(&pagemap, start, start + 4096, false, &mut Vec::new()).unwrap_err();

        // EPERM where the kernel has the ioctl (the range is not registered), ENOTTY or
        // EINVAL where it does not.
        let code = error.raw_os_error();
        assert!(
            [libc::EPERM, libc::ENOTTY, libc::EINVAL]
                .map(Some)
                .contains(&code),
            "{error}"
        );
    }
}
