#!/usr/bin/env python3
"""Pushes an image of random layers to a registry through the OCI
distribution API (monolithic uploads), and prints its total blob bytes.

    oci-push.py 127.0.0.1:5000 bench/big 1 --layers 4 --layer-mib 50
"""
import argparse
import hashlib
import json
import os
import urllib.request


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, r.headers, r.read()


def push_blob(registry, name, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, headers, _ = request("POST", f"http://{registry}/v2/{name}/blobs/uploads/")
    location = headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    sep = "&" if "?" in location else "?"
    request("PUT", f"{location}{sep}digest={digest}", data,
            {"Content-Type": "application/octet-stream"})
    return digest


def main():
    p = argparse.ArgumentParser()
    p.add_argument("registry")
    p.add_argument("name")
    p.add_argument("tag")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--layer-mib", type=int, default=50)
    a = p.parse_args()
    layers = []
    for _ in range(a.layers):
        data = os.urandom(a.layer_mib << 20)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": push_blob(a.registry, a.name, data), "size": len(data)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": push_blob(a.registry, a.name, config), "size": len(config)},
                "layers": layers}
    request("PUT", f"http://{a.registry}/v2/{a.name}/manifests/{a.tag}", json.dumps(manifest).encode(),
            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    print(sum(l["size"] for l in layers) + len(config))


if __name__ == "__main__":
    main()
