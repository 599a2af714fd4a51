//! Opening a block device or a regular file as a [`Device`], choosing the backend,
//! and recognising other filesystems' signatures before anyone formats over them.

use super::{AlignedBuf, Device, SyncDevice, UringDevice, BLOCK_SIZE};
use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Environment variable that overrides [`Backend::Auto`]: `pread`, `io_uring`
/// (then without fallback) or `auto`.
const BACKEND_ENV: &str = "LCFS_IO_BACKEND";

/// Which I/O backend [`open_device`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// io_uring where the host allows it, else pread/pwrite (logged as a warning).
    /// The `LCFS_IO_BACKEND` environment variable overrides this choice.
    #[default]
    Auto,
    /// io_uring or an error.
    IoUring,
    /// Plain pread/pwrite.
    Pread,
}

/// How [`open_device`] opens a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    pub backend: Backend,
    /// Create a sparse regular file of this size when the path is missing (or an
    /// empty regular file).
    pub create_size_bytes: Option<u64>,
}

/// Opens a block device (O_EXCL, size from BLKGETSIZE64, logical block size from
/// BLKSSZGET) or a regular file (size rounded down to 4096) with O_DIRECT.
pub fn open_device(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Device>> {
    let backend = resolve_backend(opts.backend)?;
    let metadata = match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match opts.create_size_bytes {
            Some(size) => {
                create_sparse_file(path, size)?;
                fs::metadata(path)?
            }
            None => return Err(Error::Io(e)),
        },
        Err(e) => return Err(Error::Io(e)),
        Ok(m) if m.is_file() && m.len() == 0 && opts.create_size_bytes.is_some() => {
            create_sparse_file(path, opts.create_size_bytes.unwrap_or(0))?;
            fs::metadata(path)?
        }
        Ok(m) => m,
    };

    let file_type = metadata.file_type();
    let (file, size_bytes, logical_block_size) = if file_type.is_block_device() {
        open_block_device(path)?
    } else if file_type.is_file() {
        open_regular_file(path)?
    } else {
        let kind = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_char_device() {
            "a character device"
        } else {
            "neither a block device nor a regular file"
        };
        return Err(Error::Invalid(format!("{}: is {kind}", path.display())));
    };
    if size_bytes < BLOCK_SIZE as u64 {
        return Err(Error::Invalid(format!(
            "{}: size {size_bytes} bytes is smaller than one {BLOCK_SIZE}-byte block",
            path.display()
        )));
    }

    let device: Box<dyn Device> = match backend {
        Backend::Pread => Box::new(SyncDevice::from_file(file, size_bytes, logical_block_size)),
        Backend::IoUring => Box::new(UringDevice::from_file(
            file,
            size_bytes,
            logical_block_size,
        )?),
        Backend::Auto => {
            // Keep a second descriptor of the same open file for the fallback:
            // from_file consumes the File even when it fails.
            let spare = file.try_clone()?;
            match UringDevice::from_file(file, size_bytes, logical_block_size) {
                Ok(device) => Box::new(device),
                Err(e) => {
                    log::warn!(
                        "{}: io_uring unavailable ({e}); falling back to pread/pwrite \
                         (set {BACKEND_ENV}=pread to choose it explicitly)",
                        path.display()
                    );
                    Box::new(SyncDevice::from_file(spare, size_bytes, logical_block_size))
                }
            }
        }
    };
    log::info!(
        "{}: {} bytes, logical block {} bytes, I/O backend {}",
        path.display(),
        device.size_bytes(),
        device.logical_block_size(),
        device.backend()
    );
    Ok(device)
}

/// Applies the `LCFS_IO_BACKEND` override to [`Backend::Auto`].
fn resolve_backend(requested: Backend) -> Result<Backend> {
    if requested != Backend::Auto {
        return Ok(requested);
    }
    match std::env::var(BACKEND_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(Backend::Auto),
        Ok(value) => match value.as_str() {
            "" | "auto" => Ok(Backend::Auto),
            "pread" => Ok(Backend::Pread),
            "io_uring" => Ok(Backend::IoUring),
            other => Err(Error::Invalid(format!(
                "{BACKEND_ENV}={other:?}: expected \"pread\", \"io_uring\" or \"auto\""
            ))),
        },
        Err(e) => Err(Error::Invalid(format!("{BACKEND_ENV}: {e}"))),
    }
}

fn open_block_device(path: &Path) -> Result<(File, u64, u32)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::Busy(format!(
                "{} is in use (mounted, or opened exclusively elsewhere)",
                path.display()
            )),
            _ => Error::Io(e),
        })?;
    let fd = file.as_raw_fd();
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a
    // live local u64; fd is an open block device.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size_bytes as *mut u64) } != 0 {
        return Err(Error::Io(io::Error::last_os_error()));
    }
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live
    // local c_int.
    if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut sector as *mut libc::c_int) } != 0 {
        return Err(Error::Io(io::Error::last_os_error()));
    }
    let logical_block_size = u32::try_from(sector).unwrap_or(0);
    if logical_block_size == 0 || logical_block_size as usize > BLOCK_SIZE {
        return Err(Error::Invalid(format!(
            "{}: logical block size {sector} is not supported (at most {BLOCK_SIZE})",
            path.display()
        )));
    }
    Ok((file, round_down(size_bytes), logical_block_size))
}

fn open_regular_file(path: &Path) -> Result<(File, u64, u32)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => Error::Invalid(format!(
                "{}: the filesystem does not support O_DIRECT",
                path.display()
            )),
            _ => Error::Io(e),
        })?;
    let size_bytes = round_down(file.metadata()?.len());
    let logical_block_size = match direct_io_alignment(&file) {
        None | Some(0..=512) => 512,
        Some(align) if align as usize <= BLOCK_SIZE => align,
        Some(align) => {
            return Err(Error::Invalid(format!(
                "{}: the filesystem needs {align}-byte aligned direct I/O (at most {BLOCK_SIZE} supported)",
                path.display()
            )))
        }
    };
    Ok((file, size_bytes, logical_block_size))
}

/// The file offset alignment O_DIRECT needs, as statx(STATX_DIOALIGN) reports it
/// (Linux 6.1+); `None` when the kernel or filesystem does not say.
fn direct_io_alignment(file: &File) -> Option<u32> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string with AT_EMPTY_PATH, so statx describes
    // the open fd; stx is a live, writable statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

/// BLKGETSIZE64 = _IOR(0x12, 114, size_t); the libc crate does not export it. The
/// read direction bit sits at bit 30 on most architectures, at bit 29 on these.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl =
    (2 << 29 | (std::mem::size_of::<usize>() << 16) | (0x12 << 8) | 114) as libc::Ioctl;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl =
    (2 << 30 | (std::mem::size_of::<usize>() << 16) | (0x12 << 8) | 114) as libc::Ioctl;

fn round_down(size_bytes: u64) -> u64 {
    size_bytes - size_bytes % BLOCK_SIZE as u64
}

/// Creates a sparse regular file of `size_bytes` (ftruncate). An existing empty
/// regular file is extended; anything else that exists is refused.
pub fn create_sparse_file(path: &Path, size_bytes: u64) -> Result<()> {
    if size_bytes == 0 {
        return Err(Error::Invalid(format!(
            "{}: cannot create a zero-size device file",
            path.display()
        )));
    }
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a regular file",
                path.display()
            )))
        }
        Ok(m) if m.len() > 0 => return Err(Error::Exists),
        _ => {}
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // Re-check on the open file: someone may have written it since the stat.
    if file.metadata()?.len() > 0 {
        return Err(Error::Exists);
    }
    file.set_len(size_bytes)?;
    Ok(())
}

/// How much of the device start [`detect_signature`] inspects.
const SIGNATURE_SCAN_BYTES: usize = 128 * 1024;

/// Names a known filesystem, partition table or volume signature at the start of
/// the device, or `None`. (The lcfs superblock itself is checked by the engine.)
pub fn detect_signature(dev: &dyn Device) -> Result<Option<String>> {
    let len = (SIGNATURE_SCAN_BYTES as u64).min(dev.size_bytes()) as usize;
    if len == 0 {
        return Ok(None);
    }
    let mut buf = AlignedBuf::new(len);
    dev.read_at(0, &mut buf[..len])?;
    Ok(signature_in(&buf[..len]).map(str::to_owned))
}

/// The signature checks, on the first bytes of a device (any length).
fn signature_in(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let u32_at = |offset: usize| {
        head.get(offset..offset + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    };

    if at(0, b"LUKS\xba\xbe") {
        return Some("luks");
    }
    if at(0, b"XFSB") {
        return Some("xfs");
    }
    if at(0, b"hsqs") {
        return Some("squashfs");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    // ext2/3/4: superblock at 1024, s_magic at +0x38, feature words at +0x5C/+0x60.
    if at(0x438, &[0x53, 0xEF]) {
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        const INCOMPAT_EXTENTS: u32 = 0x40;
        const INCOMPAT_64BIT: u32 = 0x80;
        const INCOMPAT_FLEX_BG: u32 = 0x200;
        let compat = u32_at(0x45C);
        let incompat = u32_at(0x460);
        return Some(
            if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
                "ext4"
            } else if compat & COMPAT_HAS_JOURNAL != 0 {
                "ext3"
            } else {
                "ext2"
            },
        );
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some("swap");
    }
    if at(0x8001, b"CD001") {
        return Some("iso9660");
    }
    if at(3, b"NTFS    ") {
        return Some("ntfs");
    }
    if at(0x36, b"FAT") || at(0x52, b"FAT") {
        return Some("vfat");
    }
    if at(512, b"EFI PART") {
        return Some("gpt");
    }
    if at(510, &[0x55, 0xAA]) {
        // Four 16-byte partition entries from byte 446; byte 4 of each is its type.
        let has_partition =
            (0..4).any(|i| head.get(446 + 16 * i + 4).is_some_and(|&kind| kind != 0));
        if has_partition {
            return Some("mbr");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with(offset: usize, bytes: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; SIGNATURE_SCAN_BYTES];
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
        image
    }

    #[test]
    fn recognises_each_signature() {
        let cases: &[(usize, &[u8], &str)] = &[
            (0, b"XFSB", "xfs"),
            (0, b"LUKS\xba\xbe", "luks"),
            (0, b"hsqs", "squashfs"),
            (0x10040, b"_BHRfS_M", "btrfs"),
            (0x438, &[0x53, 0xEF], "ext2"),
            (4086, b"SWAPSPACE2", "swap"),
            (4086, b"SWAP-SPACE", "swap"),
            (0x8001, b"CD001", "iso9660"),
            (3, b"NTFS    ", "ntfs"),
            (0x36, b"FAT16   ", "vfat"),
            (0x52, b"FAT32   ", "vfat"),
            (512, b"EFI PART", "gpt"),
        ];
        for &(offset, magic, name) in cases {
            assert_eq!(
                signature_in(&image_with(offset, magic)),
                Some(name),
                "{name} at {offset:#x}"
            );
        }
        let mut ext4 = image_with(0x438, &[0x53, 0xEF]);
        ext4[0x460] = 0x40;
        assert_eq!(signature_in(&ext4), Some("ext4"));
        let mut ext3 = image_with(0x438, &[0x53, 0xEF]);
        ext3[0x45C] = 0x4;
        assert_eq!(signature_in(&ext3), Some("ext3"));
    }

    #[test]
    fn mbr_needs_a_partition_entry() {
        let mut mbr = image_with(510, &[0x55, 0xAA]);
        assert_eq!(signature_in(&mbr), None);
        mbr[446 + 4] = 0x83;
        assert_eq!(signature_in(&mbr), Some("mbr"));
    }

    #[test]
    fn short_and_empty_heads_are_safe() {
        assert_eq!(signature_in(&[]), None);
        assert_eq!(signature_in(&[0u8; 4096]), None);
        assert_eq!(signature_in(&image_with(0, b"XFSB")[..4096]), Some("xfs"));
    }
}
