#!/usr/bin/env python3
"""Pulls an image through an OCI distribution endpoint (a registry or an
lcfs mirror): the manifest by tag (an index resolves to its linux/amd64
manifest), then the config and every layer, each checked against its
digest. Prints the bytes of blobs fetched; exit status 1 on any error.

    oci-pull.py http://127.0.0.1:5050 e2e/multilayer 1
"""
import hashlib
import json
import sys
import urllib.request

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def get(url, accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def checked(data, digest, what):
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        sys.exit(f"oci-pull: {what} hashes to {got}, not {digest}")
    return data


def main():
    base, name, tag = sys.argv[1:4]
    manifest = json.loads(get(f"{base}/v2/{name}/manifests/{tag}", ACCEPT))
    if "manifests" in manifest:
        entry = next(m for m in manifest["manifests"]
                     if m.get("platform", {}).get("architecture") in ("amd64", None))
        raw = get(f"{base}/v2/{name}/manifests/{entry['digest']}", ACCEPT)
        manifest = json.loads(checked(raw, entry["digest"], "the manifest"))
    total = 0
    for blob in [manifest["config"]] + manifest["layers"]:
        data = checked(get(f"{base}/v2/{name}/blobs/{blob['digest']}"), blob["digest"], "a blob")
        total += len(data)
    print(total)


if __name__ == "__main__":
    main()
