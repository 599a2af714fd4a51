//! Attributes between the engine's and the kernel's forms: times, file
//! types, the attributes of a reply, and the set-id bits a change clears.

use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};
use lcfs_engine::{Attr, Engine, Error, FileKind, TimeSet, Timestamp};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

pub(crate) fn system_time(t: Timestamp) -> SystemTime {
    if t.seconds >= 0 {
        UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanoseconds)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.seconds.unsigned_abs())
            + Duration::from_nanos(t.nanoseconds as u64)
    }
}

pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            seconds: d.as_secs() as i64,
            nanoseconds: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut seconds = -(d.as_secs() as i64);
            let mut nanoseconds = 0;
            if d.subsec_nanos() > 0 {
                seconds -= 1;
                nanoseconds = 1_000_000_000 - d.subsec_nanos();
            }
            Timestamp {
                seconds,
                nanoseconds,
            }
        }
    }
}

pub(crate) fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

pub(crate) fn file_attr(ino: INodeNo, a: &Attr) -> FileAttr {
    FileAttr {
        ino,
        size: a.size,
        blocks: a.blocks_512,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// Whether process `pid` holds CAP_FSETID (bit 4 of CapEff). Unknown
/// counts as not holding it: clearing a set-id bit is the safe side.
pub(crate) fn has_fsetid(pid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

pub(crate) fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(timestamp(s)),
    }
}

/// HANDLE_KILLPRIV_V2 leaves clearing set-user-id and set-group-id to
/// us, as the kernel would: on chown of a non-directory always, on
/// truncate and write only when the caller lacks CAP_FSETID (the kernel
/// flags such a write; for truncate fuser does not pass the flag on, so
/// `caller`'s capabilities are read from /proc, only for set-id files;
/// `caller` None clears unconditionally). Set-group-id goes only with
/// group execute (else it marks mandatory locking). Returns the mode to
/// set, if any bit goes.
pub(crate) fn mode_without_set_id(
    engine: &Engine,
    layer: u64,
    inode: u64,
    caller: Option<u32>,
) -> Option<u32> {
    let a = engine.getattr(layer, inode).ok()?;
    if a.kind == FileKind::Directory {
        return None;
    }
    let mut kill = 0;
    if a.mode & libc::S_ISUID != 0 {
        kill |= libc::S_ISUID;
    }
    if a.mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        kill |= libc::S_ISGID;
    }
    if kill == 0 || caller.is_some_and(has_fsetid) {
        return None;
    }
    Some(a.mode & !kill)
}
