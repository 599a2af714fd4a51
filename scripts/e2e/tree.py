#!/usr/bin/env python3
"""Directory-tree tools for the end-to-end checks (clone-semantics.sh, kill9.sh).

  tree.py manifest DIR          one line per entry, sorted, to stdout
  tree.py extras DIR            adds the odd cases a Debian rootfs lacks
  tree.py mutate DIR ROUND      applies a fixed list of changes (ROUND 1 or 2)
  tree.py fill DIR SEED COUNT   writes COUNT files of seeded random content
                                and fsyncs them and their directories

A manifest line holds everything that must survive a copy or a clone:
path, type, permission bits, owner, size, mtime (ns), link count, device
numbers, symlink target, SHA-256 of the content, extended attributes, and
the hardlink group (the first path, in sorted order, of the entries that
share an inode). Inode numbers, st_blocks, atime and ctime are left out:
they legitimately differ between file systems. Directory sizes too.

Every change `mutate` makes is deterministic, timestamps included (it sets
the mtime of each path it touches, and of their parent directories, to a
fixed value), so applying it to a layer clone and to a reference copy on
ext4 must give identical manifests.
"""

import hashlib
import os
import random
import stat
import sys

FIXED_NS = 1_700_000_000_123_456_789


def xattrs(path):
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return []
    return [
        "%s=%s" % (name, os.getxattr(path, name, follow_symlinks=False).hex())
        for name in names
    ]


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def manifest(root):
    entries = []
    inodes = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in [None] + sorted(dirs + files):
            if name is None:
                if directory != root:
                    continue
                path = root
            else:
                path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entries.append((rel, path, st))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    group = {}
    for names in inodes.values():
        first = min(names)
        for name in names:
            group[name] = first
    lines = []
    for rel, path, st in sorted(entries):
        mode = st.st_mode
        kind = stat.S_IFMT(mode)
        fields = [
            rel,
            {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
             stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}.get(kind, "?"),
            "%04o" % stat.S_IMODE(mode),
            "%d:%d" % (st.st_uid, st.st_gid),
            "nlink=%d" % st.st_nlink,
            "mtime=%d" % st.st_mtime_ns,
        ]
        if kind == stat.S_IFREG:
            fields += ["size=%d" % st.st_size, "sha256=" + sha256(path)]
            if rel in group:
                fields.append("hardlink=" + group[rel])
        elif kind == stat.S_IFLNK:
            fields.append("target=" + os.readlink(path))
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            fields.append("rdev=%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
        fields += xattrs(path)
        lines.append("\t".join(fields))
    return lines


def set_times(paths):
    """Fixed mtime (and atime) on each path and its parent directory."""
    for path in paths:
        for target in (path, os.path.dirname(path)):
            if os.path.lexists(target):
                os.utime(target, ns=(FIXED_NS, FIXED_NS), follow_symlinks=False)


def write(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)


def extras(root):
    """Cases a minbase rootfs lacks: hardlink groups, xattrs (user, trusted,
    security.capability), a sparse file, a fifo, odd modes and owners, a
    255-byte name, a deep path, a dangling symlink, a large file."""
    base = os.path.join(root, "lcfs-test")
    os.makedirs(base)
    rng = random.Random(7)
    write(os.path.join(base, "hardlink-a"), b"shared by two names\n")
    os.link(os.path.join(base, "hardlink-a"), os.path.join(base, "hardlink-b"))
    write(os.path.join(base, "trio-a"), b"three names\n" * 100)
    os.link(os.path.join(base, "trio-a"), os.path.join(base, "trio-b"))
    os.makedirs(os.path.join(base, "sub"))
    os.link(os.path.join(base, "trio-a"), os.path.join(base, "sub", "trio-c"))
    xattr_file = os.path.join(base, "xattrs")
    write(xattr_file, b"has extended attributes\n")
    os.setxattr(xattr_file, "user.lcfs", b"user value")
    os.setxattr(xattr_file, "user.empty", b"")
    os.setxattr(xattr_file, "trusted.lcfs", bytes(range(256)))
    # VFS_CAP_REVISION_2 header, cap_net_raw (bit 13) permitted + effective.
    capability = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")
    os.setxattr(xattr_file, "security.capability", capability)
    os.setxattr(os.path.join(base, "sub"), "user.on-a-directory", b"yes")
    with open(os.path.join(base, "sparse"), "wb") as f:
        f.seek(3 << 20)
        f.write(b"after a 3 MiB hole")
        f.truncate(8 << 20)
    write(os.path.join(base, "large"), rng.randbytes(24 << 20))
    write(os.path.join(base, "empty"), b"")
    os.mkfifo(os.path.join(base, "fifo"))
    os.mknod(os.path.join(base, "null-copy"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(base, "block-dev"), 0o640 | stat.S_IFBLK, os.makedev(7, 200))
    os.symlink("does/not/exist", os.path.join(base, "dangling"))
    os.symlink("../lcfs-test/hardlink-a", os.path.join(base, "relative-link"))
    setuid = os.path.join(base, "setuid")
    write(setuid, b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    sticky = os.path.join(base, "sticky")
    os.makedirs(sticky)
    os.chmod(sticky, 0o1777)
    owned = os.path.join(base, "owned")
    write(owned, b"owner 12345:54321\n")
    os.chown(owned, 12345, 54321)
    os.chmod(owned, 0o640)
    write(os.path.join(base, "n" * 255), b"a 255-byte name\n")
    deep = os.path.join(base, *["d%02d" % i for i in range(30)])
    os.makedirs(deep)
    write(os.path.join(deep, "leaf"), b"deep\n")
    for i in range(200):
        write(os.path.join(base, "sub", "small-%03d" % i), rng.randbytes(rng.randrange(0, 9000)))


def mutate(root, round_number):
    """The changes made in a clone. Every path named exists in a Debian
    bookworm minbase rootfs with `extras` applied."""
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    touched = []
    if round_number == 1:
        # Content: replace, overwrite in the middle, append, truncate, extend.
        write(p("etc/debian_version"), b"lcfs clone\n")
        with open(p("usr/bin/bash"), "r+b") as f:
            f.seek(100_000)
            f.write(b"0123456789abcdef")
        write(p("etc/passwd"), b"clone:x:4242:4242::/nonexistent:/usr/sbin/nologin\n", "ab")
        os.truncate(p("usr/bin/ls"), 5000)
        os.truncate(p("lcfs-test/sparse"), 12 << 20)
        with open(p("lcfs-test/large"), "r+b") as f:
            f.seek((8 << 20) + 123)
            f.write(b"x" * 70_000)
        # A write through one name of a hardlink group shows in the other.
        write(p("lcfs-test/hardlink-a"), b"changed in the clone\n", "ab")
        touched += ["etc/debian_version", "usr/bin/bash", "etc/passwd", "usr/bin/ls",
                    "lcfs-test/sparse", "lcfs-test/large", "lcfs-test/hardlink-a"]
        # Metadata only.
        os.chmod(p("etc/debian_version"), 0o600)
        os.chmod(p("usr/bin/dash"), 0o700)
        os.lchown(p("usr/bin/cat"), 4242, 4343)
        os.lchown(p("lcfs-test/relative-link"), 7, 8)
        os.setxattr(p("lcfs-test/xattrs"), "user.added", b"in the clone")
        os.removexattr(p("lcfs-test/xattrs"), "user.lcfs")
        os.setxattr(p("lcfs-test/xattrs"), "security.capability",
                    bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000"))
        touched += ["usr/bin/dash", "usr/bin/cat", "lcfs-test/xattrs", "lcfs-test/relative-link"]
        # Delete: a file, a symlink, one name of a hardlink group, a tree.
        os.unlink(p("usr/bin/vdir"))
        os.unlink(p("etc/os-release"))
        os.unlink(p("lcfs-test/sub/trio-c"))
        for directory, dirs, files in os.walk(p("usr/share/doc"), topdown=False):
            for name in files:
                os.unlink(os.path.join(directory, name))
            for name in dirs:
                full = os.path.join(directory, name)
                (os.unlink if os.path.islink(full) else os.rmdir)(full)
        os.rmdir(p("usr/share/doc"))
        touched += ["usr/bin/vdir", "etc/os-release", "lcfs-test/sub/trio-c", "usr/share/doc"]
        # Rename: in place, across directories, a directory, over a file.
        os.rename(p("etc/passwd"), p("etc/passwd.moved"))
        os.rename(p("usr/bin/cat"), p("usr/local/bin/cat"))
        os.rename(p("usr/share/common-licenses"), p("usr/share/licenses-moved"))
        write(p("etc/issue.new"), b"replaced by rename\n")
        os.rename(p("etc/issue.new"), p("etc/issue"))
        os.rename(p("lcfs-test/trio-b"), p("lcfs-test/sub/trio-b"))
        touched += ["etc/passwd.moved", "usr/local/bin/cat", "usr/share/licenses-moved",
                    "etc/issue", "lcfs-test/sub/trio-b", "etc/passwd", "usr/bin/cat",
                    "usr/share/common-licenses"]
        # Create: a file, a directory, a symlink, a hardlink, a fifo, a device.
        os.makedirs(p("srv/new/dir"))
        write(p("srv/new/dir/file"), b"new in the clone\n" * 1000)
        os.symlink("/usr/local/bin/cat", p("srv/new/cat-link"))
        os.link(p("usr/bin/true"), p("srv/new/true-link"))
        os.mkfifo(p("srv/new/fifo"))
        os.mknod(p("srv/new/zero"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        touched += ["srv/new/dir/file", "srv/new/dir", "srv/new/cat-link", "srv/new/true-link",
                    "srv/new/fifo", "srv/new/zero", "srv/new", "usr/bin/true"]
    elif round_number == 2:
        # A clone of the clone: undo and redo some of round 1, empty a directory.
        write(p("etc/debian_version"), b"grandchild\n")
        os.rename(p("usr/share/licenses-moved"), p("usr/share/common-licenses"))
        os.unlink(p("srv/new/true-link"))
        for name in os.listdir(p("lcfs-test/sub")):
            full = p("lcfs-test/sub/" + name)
            if os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
        os.truncate(p("lcfs-test/large"), 0)
        write(p("lcfs-test/hardlink-b"), b"grandchild rewrote it\n")
        touched += ["etc/debian_version", "usr/share/common-licenses", "usr/share/licenses-moved",
                    "srv/new/true-link", "usr/bin/true", "lcfs-test/sub", "lcfs-test/large",
                    "lcfs-test/hardlink-b"]
    else:
        raise SystemExit("mutate: ROUND must be 1 or 2")
    set_times([p(rel) for rel in touched])


def fill(root, seed, count):
    """COUNT files of seeded content in ROOT, each fsynced, then ROOT fsynced."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        sub = os.path.join(root, "dir%02d" % (i % 7))
        if not os.path.isdir(sub):
            os.mkdir(sub)
            descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(descriptor)
            os.close(descriptor)
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 65536, 300_000, 2_000_000])
        path = os.path.join(sub, "file%05d" % i)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(descriptor, rng.randbytes(size))
        os.fsync(descriptor)
        os.close(descriptor)
        descriptor = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(descriptor)
        os.close(descriptor)


def main(argv):
    if len(argv) >= 3 and argv[1] == "manifest":
        sys.stdout.write("".join(line + "\n" for line in manifest(argv[2])))
    elif len(argv) == 3 and argv[1] == "extras":
        extras(argv[2])
    elif len(argv) == 4 and argv[1] == "mutate":
        mutate(argv[2], int(argv[3]))
    elif len(argv) == 5 and argv[1] == "fill":
        fill(argv[2], int(argv[3]), int(argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
