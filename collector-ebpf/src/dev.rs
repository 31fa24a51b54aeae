//! Device numbers in the two encodings the probe meets.
//!
//! Inside the kernel a `dev_t` is 32 bits, `MAJOR << 20 | MINOR` (`include/linux/kdev_t.h`); that
//! is what `inode->i_sb->s_dev` holds and what the BPF program sees. User space (`stat`, `statx`
//! via `makedev`, `MetadataExt::dev`) uses glibc's 64-bit encoding
//! `(minor & 0xff) | (major & 0xfff) << 8 | (minor & !0xff) << 12 | (major & !0xfff) << 32`.
//! The probe keys its `watched_devs` map and fills its events with the kernel form; this module
//! converts at the boundary. It does not look devices up.

/// Bits of the minor number in a kernel `dev_t`.
const KERNEL_MINOR_BITS: u32 = 20;
const KERNEL_MINOR_MASK: u32 = (1 << KERNEL_MINOR_BITS) - 1;
/// Largest major number a kernel `dev_t` can hold (12 bits).
const KERNEL_MAJOR_MAX: u64 = (1 << (32 - KERNEL_MINOR_BITS)) - 1;

/// Major number of a user-space `st_dev` (glibc's `gnu_dev_major`).
pub fn major(st_dev: u64) -> u64 {
    ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff)
}

/// Minor number of a user-space `st_dev` (glibc's `gnu_dev_minor`).
pub fn minor(st_dev: u64) -> u64 {
    (st_dev & 0xff) | ((st_dev >> 12) & !0xff)
}

/// User-space `st_dev` from major and minor (glibc's `gnu_dev_makedev`).
pub fn makedev(major: u64, minor: u64) -> u64 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
}

/// User-space `st_dev` of a kernel `dev_t` (what `stat` reports for `i_sb->s_dev`).
pub fn st_dev_from_kernel(kdev: u32) -> u64 {
    makedev(
        u64::from(kdev >> KERNEL_MINOR_BITS),
        u64::from(kdev & KERNEL_MINOR_MASK),
    )
}

/// Kernel `dev_t` of a user-space `st_dev`, or `None` when its numbers do not fit in 32 bits
/// (no kernel file system can have such a device, so nothing there can be watched).
pub fn kernel_from_st_dev(st_dev: u64) -> Option<u32> {
    let (major, minor) = (major(st_dev), minor(st_dev));
    if major > KERNEL_MAJOR_MAX || minor > u64::from(KERNEL_MINOR_MASK) {
        return None;
    }
    u32::try_from(major << KERNEL_MINOR_BITS | minor).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libc_makedev() {
        for (ma, mi) in [
            (0u32, 0u32),
            (8, 1),
            (254, 0),
            (0, 27),
            (259, 3),
            (4095, 1_048_575),
            (0, 256),
            (7, 300_000),
        ] {
            let libc_dev = libc::makedev(ma, mi);
            assert_eq!(makedev(u64::from(ma), u64::from(mi)), libc_dev, "{ma}:{mi}");
            assert_eq!(major(libc_dev), u64::from(libc::major(libc_dev)));
            assert_eq!(minor(libc_dev), u64::from(libc::minor(libc_dev)));
        }
    }

    #[test]
    fn kernel_dev_round_trips() {
        // /dev/vda is 254:0 -> kernel 0x0fe0_0000, st_dev 0xfe00.
        assert_eq!(st_dev_from_kernel(254 << 20), 0xfe00);
        assert_eq!(kernel_from_st_dev(0xfe00), Some(254 << 20));
        // Anonymous devices (tmpfs, NFS, overlay) are 0:N; N above 255 uses the high minor bits.
        assert_eq!(st_dev_from_kernel(27), 27);
        assert_eq!(st_dev_from_kernel(300), libc::makedev(0, 300));
        for (ma, mi) in [
            (0u32, 0u32),
            (8, 17),
            (0, 1_048_575),
            (4095, 0),
            (259, 70_000),
        ] {
            let kdev = ma << 20 | mi;
            let st = st_dev_from_kernel(kdev);
            assert_eq!(st, libc::makedev(ma, mi));
            assert_eq!(kernel_from_st_dev(st), Some(kdev));
        }
    }

    #[test]
    fn st_dev_too_wide_for_the_kernel_is_none() {
        assert_eq!(kernel_from_st_dev(libc::makedev(4096, 0)), None);
        assert_eq!(kernel_from_st_dev(libc::makedev(0, 1 << 20)), None);
    }
}
