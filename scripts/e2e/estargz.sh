#!/usr/bin/env bash
# eStargz, lcfs against the reference implementation (docs/lazy.md): the
# estargz package of containerd's stargz-snapshotter, Debian's source built
# here (scripts/e2e/estargz-ref). Two layers, the Debian rootfs (GNU tar,
# posix format, xattrs) and a made tar of the corner cases (long names and
# link targets, ids past ustar's, xattrs, hard and symbolic links, a fifo, a
# device, a file of several chunks, empty files, a name given twice):
#   lcfs estargz build -> the reference opens it, checks the TOC digest
#     lcfs printed and reads every file: the same names, sizes and
#     digests as `lcfs estargz verify --list`, and as the input's;
#   the reference builds -> `lcfs estargz verify --toc-digest` checks it
#     and lists what the reference lists;
#   both blobs are ordinary tar+gzip layers: GNU tar extracts the input;
#   a `docker save` archive converted (lcfs estargz convert): the reference
#     checks each layer against its annotation, the config lists the new
#     DiffIDs;
#   the files to fetch first lead; a changed byte, a wrong TOC digest and
#   a truncated blob are refused with the reason.
E2E_NAME="estargz"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_commands go python3 jq tar cmp
e2e_init
lcfs_build
ensure_rootfs_tarball

# --- the reference tool ---------------------------------------------------------
src=$(bash "$E2E_REPO/scripts/setup.sh" --deb-dir golang-github-containerd-stargz-snapshotter-dev) ||
    die "the stargz-snapshotter source is not unpacked; run scripts/setup.sh"
ref="$E2E_WORK/estargz-ref"
(cd "$E2E_DIR/estargz-ref" &&
    GO111MODULE=off GOPATH="$src/usr/share/gocode:/usr/share/gocode" GOCACHE="$E2E_WORK/gocache" \
        quietly go build -o "$ref" main.go) || die "the reference tool does not build"
say "reference: stargz-snapshotter $(basename "$src" | sed 's/.*-dev-//') estargz, $(go version | awk '{ print $3 }')"

# --- the corner cases -------------------------------------------------------------
python3 - "$E2E_WORK/corner.tar" <<'PY'
import io, os, sys, tarfile
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    i.mtime = kw.pop("mtime", 1_700_000_000)
    i.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(i, k, v)
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
add("etc/", tarfile.DIRTYPE, mode=0o755)
add("etc/hostname", data=b"lcfs\n")
add("etc/empty")
add("deep/" + "d" * 150 + "/", tarfile.DIRTYPE, mode=0o755)
add("deep/" + "d" * 150 + "/file", data=b"a long name\n")
add("to-deep", tarfile.SYMTYPE, linkname="deep/" + "d" * 150 + "/file")
add("etc/fifo", tarfile.FIFOTYPE)
add("etc/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
add("etc/big-ids", data=b"ids\n", uid=3_000_000, gid=4_000_000, uname="someone", gname="group")
add("etc/caps", data=b"xattrs\n", pax_headers={"SCHILY.xattr.user.note": "n\u00e9e", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
add("etc/hard", tarfile.LNKTYPE, linkname="etc/caps")
add("big.bin", data=os.urandom(5 * (1 << 20) + 12345), mode=0o755)
add("etc/hostname", data=b"given twice: this one stays\n")
add("\u00fcn\u00efcode", data=b"utf-8\n")
t.close()
PY

# ref_list BLOB DIGEST: the reference's listing (it checks the TOC digest).
ref_list() { "$ref" list "$1" "$2"; }
lcfs_list() { "$LCFS_BIN" estargz verify "$1" --toc-digest "$2" --list; }

for layer in corner debian; do
    case $layer in
        corner) input="$E2E_WORK/corner.tar" prefetch=(--prefetch etc/caps --prefetch "deep/$(printf 'd%.0s' {1..150})/file") ;;
        debian) input="$DEBIAN_TARBALL" prefetch=(--prefetch ./usr/bin/bash --prefetch ./etc/passwd) ;;
    esac
    blob="$E2E_WORK/$layer.lcfs.esgz"
    "$LCFS_BIN" estargz build "$input" "$blob" --chunk-size 1048576 "${prefetch[@]}" --json >"$E2E_WORK/$layer.json" ||
        die "lcfs estargz build $layer failed"
    toc=$(jq -r .toc_digest "$E2E_WORK/$layer.json")
    say "$layer: $(jq -r '"\(.entries) entries, \(.blob_size) bytes, toc \(.toc_digest)"' "$E2E_WORK/$layer.json")"
    ref_list "$blob" "$toc" >"$E2E_WORK/$layer.ref-of-lcfs" 2>"$E2E_WORK/$layer.ref-of-lcfs.err" ||
        fail "$layer: the reference refuses lcfs's blob: $(tail -n 2 "$E2E_WORK/$layer.ref-of-lcfs.err")"
    lcfs_list "$blob" "$toc" >"$E2E_WORK/$layer.lcfs-of-lcfs" || fail "$layer: lcfs refuses its own blob"
    expect "$layer: the reference reads lcfs's blob as lcfs does ($(wc -l <"$E2E_WORK/$layer.lcfs-of-lcfs") files)" "" \
        "$(diff "$E2E_WORK/$layer.ref-of-lcfs" "$E2E_WORK/$layer.lcfs-of-lcfs" | head -n 5)"

    # The input's files, as GNU tar extracts them, hash as listed.
    mkdir -p "$E2E_WORK/$layer.in" "$E2E_WORK/$layer.out"
    tar --numeric-owner -xpf "$input" -C "$E2E_WORK/$layer.in" 2>/dev/null || die "tar -x $input failed"
    tar --numeric-owner -xpzf "$blob" -C "$E2E_WORK/$layer.out" 2>/dev/null ||
        fail "$layer: GNU tar does not extract lcfs's blob"
    expect "$layer: lcfs's blob extracts with GNU tar to the input's tree" "" \
        "$(diff -r --no-dereference "$E2E_WORK/$layer.in" "$E2E_WORK/$layer.out" 2>&1 |
            grep -v 'landmark\|stargz.index.json\|is a fifo while\|special file while' | head -n 5)"
    mismatch=$(awk -F'\t' -v dir="$E2E_WORK/$layer.in" '$1 !~ /landmark$/ { print dir "/" $1 "\t" $3 }' "$E2E_WORK/$layer.lcfs-of-lcfs" |
        while IFS=$'\t' read -r path digest; do
            [[ "sha256:$(sha256sum "$path" | cut -d' ' -f1)" == "$digest" ]] || echo "$path"
        done | head -n 3)
    expect "$layer: every file's digest is its content's" "" "$mismatch"

    # The reference's blob, read by lcfs.
    ref_blob="$E2E_WORK/$layer.ref.esgz"
    ref_toc=$("$ref" build "$input" "$ref_blob" 2>"$E2E_WORK/$layer.ref-build.err") ||
        die "$layer: the reference does not build: $(tail -n 2 "$E2E_WORK/$layer.ref-build.err")"
    ref_list "$ref_blob" "$ref_toc" >"$E2E_WORK/$layer.ref-of-ref" || fail "$layer: the reference refuses its own blob"
    lcfs_list "$ref_blob" "$ref_toc" >"$E2E_WORK/$layer.lcfs-of-ref" ||
        fail "$layer: lcfs refuses the reference's blob"
    expect "$layer: lcfs reads the reference's blob as the reference does" "" \
        "$(diff "$E2E_WORK/$layer.ref-of-ref" "$E2E_WORK/$layer.lcfs-of-ref" | head -n 5)"
done

# --- a whole image -------------------------------------------------------------
# A `docker save` archive of two layers (the corner cases, and a layer
# whiting one of them out), converted; each layer checked by the reference
# against the TOC digest its annotation carries.
python3 - "$E2E_WORK/corner.tar" "$E2E_WORK/saved.tar" <<'PY'
import hashlib, io, json, sys, tarfile
corner = open(sys.argv[1], "rb").read()
top = io.BytesIO()
with tarfile.open(fileobj=top, mode="w") as t:
    i = tarfile.TarInfo("etc/.wh.hostname")
    t.addfile(i, io.BytesIO(b""))
top = top.getvalue()
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                     "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(l).hexdigest() for l in (corner, top)]}}).encode()
manifest = json.dumps([{"Config": "config.json", "RepoTags": ["e2e/lazy:1"], "Layers": ["1/layer.tar", "2/layer.tar"]}]).encode()
with tarfile.open(sys.argv[2], "w") as t:
    for name, data in (("1/layer.tar", corner), ("2/layer.tar", top), ("config.json", config), ("manifest.json", manifest)):
        i = tarfile.TarInfo(name)
        i.size = len(data)
        t.addfile(i, io.BytesIO(data))
PY
"$LCFS_BIN" estargz convert "$E2E_WORK/saved.tar" "$E2E_WORK/layout" --json >"$E2E_WORK/converted.json" ||
    die "lcfs estargz convert failed"
layout="$E2E_WORK/layout"
manifest="$layout/blobs/sha256/$(jq -r '.manifests[0].digest | ltrimstr("sha256:")' "$layout/index.json")"
checked=0
while read -r digest toc; do
    "$ref" list "$layout/blobs/sha256/${digest#sha256:}" "$toc" >/dev/null 2>"$E2E_WORK/layer.err" ||
        fail "the reference refuses converted layer $digest: $(tail -n 1 "$E2E_WORK/layer.err")"
    checked=$((checked + 1))
done < <(jq -r '.layers[] | "\(.digest) \(.annotations["containerd.io/snapshot/stargz/toc.digest"])"' "$manifest")
expect "a converted image: the reference checks each layer against its annotation" 2 "$checked"
config="$layout/blobs/sha256/$(jq -r '.config.digest | ltrimstr("sha256:")' "$manifest")"
expect "a converted image: the config's DiffIDs are the new layers'" \
    "$(jq -c '[.layers[].diff_id]' "$E2E_WORK/converted.json")" "$(jq -c '.rootfs.diff_ids' "$config")"
expect "a converted image: the index names it" "e2e/lazy:1" \
    "$(jq -r '.manifests[0].annotations["io.containerd.image.name"]' "$layout/index.json")"

# --- what leads, and what is refused --------------------------------------------
first=$("$LCFS_BIN" estargz verify "$E2E_WORK/debian.lcfs.esgz" --json | jq -r '.prefetch | join(" ")')
expect "the files to fetch first lead, after their directories" "usr usr/bin usr/bin/bash etc etc/passwd" "$first"
blob="$E2E_WORK/corner.lcfs.esgz"
toc=$(jq -r .toc_digest "$E2E_WORK/corner.json")
bad="$E2E_WORK/corner.bad.esgz"
# A byte in the middle of the blob: big.bin's random content fills most of it.
cp "$blob" "$bad"
at=$(python3 -c "import json; print(json.load(open('$E2E_WORK/corner.json'))['blob_size'] // 2)")
printf '\xff' | dd of="$bad" bs=1 seek="$at" conv=notrunc status=none
out=$("$LCFS_BIN" estargz verify "$bad" --toc-digest "$toc" 2>&1) && fail "a changed byte was not noticed"
expect "a changed byte in a chunk is refused, naming the file" 1 "$(grep -c 'big.bin' <<<"$out")"
out=$("$LCFS_BIN" estargz verify "$blob" --toc-digest "sha256:$(printf '0%.0s' {1..64})" 2>&1) &&
    fail "a wrong TOC digest was accepted"
expect "a wrong TOC digest is refused" 1 "$(grep -c 'the TOC hashes to' <<<"$out")"
head -c 1000 "$blob" >"$bad"
out=$("$LCFS_BIN" estargz verify "$bad" 2>&1) && fail "a truncated blob was accepted"
expect "a truncated blob is refused" 1 "$(grep -c 'not an eStargz layer' <<<"$out")"
out=$("$LCFS_BIN" estargz build "$E2E_WORK/corner.tar" "$blob" 2>&1) && fail "an existing output was overwritten"
expect "an existing output is never written over" 1 "$(grep -c 'File exists' <<<"$out")"

e2e_finish "eStargz layers of lcfs and of the reference implementation read alike both ways"
