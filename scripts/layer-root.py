#!/usr/bin/env python3
"""Computes a layer root (docs/format.md, "Layer digests") from a directory
tree, independently of lcfs: point it at a layer's directory in the lcfs
mount, or at the same tree anywhere else (an untarred image layer), and it
prints what `lcfs layer digest` prints for that layer.

    python3 scripts/layer-root.py DIR            # sha256:<root>
    python3 scripts/layer-root.py --files DIR    # each regular file's digest too
"""
import hashlib
import os
import stat
import struct
import sys

BLOCK = 4096


def fsverity_digest(path):
    """fs-verity's file digest: SHA-256, 4 KiB blocks, no salt."""
    size = 0
    level = []
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            size += len(block)
            level.append(hashlib.sha256(block.ljust(BLOCK, b"\0")).digest())
    if not level:
        root = bytes(32)
    else:
        while len(level) > 1:
            joined = b"".join(level)
            level = [hashlib.sha256(joined[i:i + BLOCK].ljust(BLOCK, b"\0")).digest()
                     for i in range(0, len(joined), BLOCK)]
        root = level[0]
    descriptor = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, size) + root.ljust(64, b"\0") + bytes(176)
    return hashlib.sha256(descriptor).digest()


def string(b):
    return struct.pack("<I", len(b)) + b


KINDS = [(stat.S_ISREG, 1), (stat.S_ISDIR, 2), (stat.S_ISLNK, 3), (stat.S_ISCHR, 4),
         (stat.S_ISBLK, 5), (stat.S_ISFIFO, 6), (stat.S_ISSOCK, 7)]


def record(top, rel, files):
    full = os.path.join(top, rel) if rel else top
    st = os.lstat(full)
    kind = next(k for test, k in KINDS if test(st.st_mode))
    rdev = st.st_rdev if kind in (4, 5) else 0
    names = sorted(os.fsencode(x) for x in os.listxattr(full, follow_symlinks=False))
    xattrs = b"".join(string(n) + string(os.getxattr(full, n, follow_symlinks=False)) for n in names)
    target = os.fsencode(os.readlink(full)) if kind == 3 else b""
    digest = bytes(32)
    if kind == 1:
        digest = fsverity_digest(full)
        if files:
            print("sha256:" + digest.hex(), os.fsdecode(rel))
    return (string(os.fsencode(rel)) + bytes([kind])
            + struct.pack("<IIIQI", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, rdev, len(names))
            + xattrs + string(target) + digest), kind


def layer_root(top, files=False):
    h = hashlib.sha256(b"lcfs layer root v1\0")
    stack = [b""]
    while stack:
        rel = stack.pop()
        rec, kind = record(os.fsencode(top), rel, files)
        h.update(rec)
        if kind == 2:
            full = os.path.join(os.fsencode(top), rel) if rel else os.fsencode(top)
            for name in sorted(os.listdir(full), reverse=True):
                stack.append(rel + b"/" + name if rel else name)
    return "sha256:" + h.hexdigest()


if __name__ == "__main__":
    args = sys.argv[1:]
    files = "--files" in args
    args = [a for a in args if a != "--files"]
    if len(args) != 1:
        sys.exit(__doc__)
    print(layer_root(args[0], files))
