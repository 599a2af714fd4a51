#!/usr/bin/env python3
"""Test images for the Docker and containerd checks, built locally.

  images.py busybox OUT.tar       a rootfs tarball (for `docker import`):
                                  /bin/busybox (static) and a symlink per
                                  applet, /etc/passwd and /etc/group
  images.py busybox-image OUT.tar NAME:TAG
                                  the same rootfs as a one-layer image, a
                                  `docker save` archive (for `docker load`
                                  and `ctr images import`)
  images.py rootfs-image ROOTFS.tar OUT.tar NAME:TAG [--gzip]
                                  any rootfs tarball as a one-layer image
                                  (read in a stream; PATH set as Debian's),
                                  with --gzip its layer gzipped
  images.py multilayer OUT.tar    a `docker save` archive (for `docker load`)
                                  of image multilayer:1, three layers:
                                    1. the busybox rootfs plus /data with a
                                       hardlink group, a symlink, a fifo, a
                                       file with a user xattr (PAX header),
                                       a 200-byte name, a sparse-ish file
                                    2. whiteouts: /data/gone deleted, /data/dir
                                       made opaque with one new file, a
                                       hardlink added to a new file, a file
                                       in layer 1 replaced
                                    3. a deep path and a file under /data/dir
  images.py expect-multilayer     what `find /data | sort` and a few reads
                                  print inside a container of multilayer:1
                                  (the check runs the same commands)

Everything is deterministic (fixed mtimes, owners, content), so the image
IDs are the same on every run.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MTIME = 1_700_000_000
BUSYBOX = "/bin/busybox"
LONG_NAME = "n" * 200


def info(name, kind=tarfile.REGTYPE, mode=0o644, size=0, **kw):
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mode = mode
    t.size = size
    t.mtime = MTIME
    t.uid = kw.get("uid", 0)
    t.gid = kw.get("gid", 0)
    t.uname = ""
    t.gname = ""
    if "linkname" in kw:
        t.linkname = kw["linkname"]
    if "pax" in kw:
        t.pax_headers = kw["pax"]
    return t


def add_file(tar, name, data, mode=0o644, **kw):
    tar.addfile(info(name, mode=mode, size=len(data), **kw), io.BytesIO(data))


def add_dir(tar, name, mode=0o755, **kw):
    tar.addfile(info(name, tarfile.DIRTYPE, mode, **kw))


def busybox_applets():
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    return sorted(a for a in out.stdout.split() if a and a != "busybox")


def busybox_rootfs(tar):
    for d in ["bin", "etc", "tmp", "root", "dev", "proc", "sys"]:
        add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
    with open(BUSYBOX, "rb") as f:
        add_file(tar, "bin/busybox", f.read(), 0o755)
    for applet in busybox_applets():
        tar.addfile(info("bin/" + applet, tarfile.SYMTYPE, 0o777, linkname="busybox"))
    add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")


def layer_tar(build):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def layer1(tar):
    busybox_rootfs(tar)
    add_dir(tar, "data")
    add_file(tar, "data/keep", b"keep in layer 1\n")
    tar.addfile(info("data/keep-link", tarfile.LNKTYPE, 0o644, linkname="data/keep"))
    add_file(tar, "data/gone", b"deleted by layer 2\n")
    add_file(tar, "data/replaced", b"old content\n", 0o600, uid=1000, gid=1000)
    tar.addfile(info("data/link", tarfile.SYMTYPE, 0o777, linkname="keep"))
    tar.addfile(info("data/fifo", tarfile.FIFOTYPE, 0o600))
    add_file(tar, "data/xattr", b"has a user xattr\n", pax={"SCHILY.xattr.user.lcfs": "test-value"})
    add_file(tar, "data/" + LONG_NAME, b"long name\n")
    add_file(tar, "data/zeros", bytes(300_000) + b"end\n")
    add_dir(tar, "data/dir")
    add_file(tar, "data/dir/old1", b"hidden by the opaque dir\n")
    add_file(tar, "data/dir/old2", b"hidden by the opaque dir\n")


def layer2(tar):
    add_dir(tar, "data")
    add_file(tar, "data/.wh.gone", b"")
    add_dir(tar, "data/dir")
    add_file(tar, "data/dir/.wh..wh..opq", b"")
    add_file(tar, "data/dir/new", b"new in layer 2\n")
    add_file(tar, "data/replaced", b"new content\n", 0o640, uid=1001, gid=1002)
    add_file(tar, "data/pair", b"hardlinked in layer 2\n")
    tar.addfile(info("data/pair-link", tarfile.LNKTYPE, 0o644, linkname="data/pair"))


def layer3(tar):
    add_dir(tar, "data")
    add_dir(tar, "data/dir")
    add_file(tar, "data/dir/third", b"layer 3\n")
    path = "data/deep"
    add_dir(tar, path)
    for i in range(10):
        path += "/d%d" % i
        add_dir(tar, path)
    add_file(tar, path + "/leaf", b"deep leaf\n")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def gzip_file(path, out):
    """Compresses the file at path into out (level 1: a registry-style layer in
    seconds; mtime 0, so the same input gives the same bytes)."""
    with open(path, "rb") as src, open(out, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)


def save_archive(out, repo_tag, layers, path_env="/bin", compress=False):
    """Writes a `docker save` archive. A layer is the bytes of a layer tar or
    the path of a tar file (streamed, for large root file systems). With
    compress, each path layer is stored gzipped, as registries serve layers
    (docker load and ctr images import detect that)."""
    diff_ids = [file_sha256(layer) if isinstance(layer, str) else sha256(layer) for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=" + path_env]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "images.py layer %d" % (i + 1)} for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": []}]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for layer, diff_id in zip(layers, diff_ids):
            name = diff_id.split(":")[1] + "/layer.tar"
            manifest[0]["Layers"].append(name)
            add_dir(tar, diff_id.split(":")[1])
            if isinstance(layer, str):
                source = layer
                if compress:
                    source = out + ".layer.gz"
                    gzip_file(layer, source)
                with open(source, "rb") as f:
                    tar.addfile(info(name, size=os.path.getsize(source)), f)
                if compress:
                    os.unlink(source)
            else:
                add_file(tar, name, layer)
        add_file(tar, config_name, config_bytes)
        add_file(tar, "manifest.json", json.dumps(manifest).encode())


EXPECT_MULTILAYER = """\
/data
/data/deep
/data/deep/d0
/data/deep/d0/d1
/data/deep/d0/d1/d2
/data/deep/d0/d1/d2/d3
/data/deep/d0/d1/d2/d3/d4
/data/deep/d0/d1/d2/d3/d4/d5
/data/deep/d0/d1/d2/d3/d4/d5/d6
/data/deep/d0/d1/d2/d3/d4/d5/d6/d7
/data/deep/d0/d1/d2/d3/d4/d5/d6/d7/d8
/data/deep/d0/d1/d2/d3/d4/d5/d6/d7/d8/d9
/data/deep/d0/d1/d2/d3/d4/d5/d6/d7/d8/d9/leaf
/data/dir
/data/dir/new
/data/dir/third
/data/fifo
/data/keep
/data/keep-link
/data/link
/data/%s
/data/pair
/data/pair-link
/data/replaced
/data/xattr
/data/zeros
""" % LONG_NAME


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "busybox":
        with open(sys.argv[2], "wb") as f:
            f.write(layer_tar(busybox_rootfs))
    elif len(sys.argv) == 3 and sys.argv[1] == "multilayer":
        save_archive(sys.argv[2], "multilayer:1", [layer_tar(layer1), layer_tar(layer2), layer_tar(layer3)])
    elif len(sys.argv) == 4 and sys.argv[1] == "busybox-image":
        save_archive(sys.argv[2], sys.argv[3], [layer_tar(busybox_rootfs)])
    elif len(sys.argv) in (5, 6) and sys.argv[1] == "rootfs-image" and sys.argv[5:] in ([], ["--gzip"]):
        save_archive(sys.argv[3], sys.argv[4], [sys.argv[2]], "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     compress=len(sys.argv) == 6)
    elif len(sys.argv) == 2 and sys.argv[1] == "expect-multilayer":
        sys.stdout.write(EXPECT_MULTILAYER)
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
