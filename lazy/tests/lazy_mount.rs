//! The lazy mount on an engine (docs/lazy.md): a layer's tree from its TOC,
//! files fetched by ranges on first read and checked chunk by chunk; a
//! registry sending wrong bytes or gone gives EIO within the bound, never
//! wrong data, and works again once right; the background fetch completes
//! a layer; a restart takes an incomplete layer up again.

mod common;

use common::{registry, Registry, Serve};
use lcfs_engine::device::MemDevice;
use lcfs_engine::{Config as EngineConfig, Engine, FormatOptions, ROOT_INODE};
use lcfs_lazy::estargz::{build, BuildOptions, Index, TOC_DIGEST_ANNOTATION};
use lcfs_lazy::mount::{self, Config, Lazy, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Layer {
    blob: Arc<Vec<u8>>,
    toc: String,
    toc_offset: usize,
    big: Vec<u8>,
}

const HELLO: &[u8] = b"#!/bin/sh\necho hello\n";

fn layer() -> Layer {
    layer_chunked(256 << 10)
}

/// A tar entry without content (a directory, or a link to `target`).
fn append_empty(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o755);
    h.set_size(0);
    match kind {
        tar::EntryType::Directory => b.append_data(&mut h, name, &[][..]).unwrap(),
        _ => b.append_link(&mut h, name, target).unwrap(),
    }
}

/// A regular file entry, owned by uid 7.
fn append_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(7);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, name, data).unwrap();
}

fn layer_chunked(chunk_size: u64) -> Layer {
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    append_empty(&mut b, tar::EntryType::Directory, "srv/", "");
    append_file(&mut b, "srv/big", &big, 0o644);
    append_file(&mut b, "bin/hello", HELLO, 0o755);
    append_empty(&mut b, tar::EntryType::Link, "bin/hello-again", "bin/hello");
    append_empty(&mut b, tar::EntryType::Symlink, "bin/sh", "hello");
    estargz_of(b.into_inner().unwrap(), chunk_size, big)
}

/// The layer tar `tar` in eStargz.
fn estargz_of(tar: Vec<u8>, chunk_size: u64, big: Vec<u8>) -> Layer {
    let mut blob = Vec::new();
    let built = build(
        Cursor::new(tar),
        &mut blob,
        &BuildOptions {
            chunk_size,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let toc_offset = Index::open(&mut Cursor::new(&blob)).unwrap().toc_offset as usize;
    Layer {
        blob: Arc::new(blob),
        toc: built.toc_digest,
        toc_offset,
        big,
    }
}

fn engine() -> (Arc<MemDevice>, Arc<Engine>) {
    let dev = Arc::new(MemDevice::new(256 << 20));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev.clone(), EngineConfig::default()).unwrap();
    (dev, e)
}

fn config(r: &Registry, background: bool) -> Config {
    let host = r.host();
    Config {
        fetch_timeout: Duration::from_millis(1500),
        background,
        registries: BTreeMap::from([(
            host.to_string(),
            mount::Registry::plain(format!("http://{host}")),
        )]),
        hosts_dir: None,
        peers: None,
    }
}

fn labels(r: &Registry, toc: &str) -> BTreeMap<String, String> {
    let host = r.host();
    BTreeMap::from([
        (LABEL_IMAGE_REF.to_string(), format!("{host}/t:1")),
        (
            LABEL_LAYER_DIGEST.to_string(),
            format!("sha256:{}", "ab".repeat(32)),
        ),
        (TOC_DIGEST_ANNOTATION.to_string(), toc.to_string()),
    ])
}

fn ino(e: &Engine, layer: u64, path: &str) -> u64 {
    let mut ino = ROOT_INODE;
    for p in path.split('/') {
        ino = e.lookup(layer, ino, p.as_bytes()).unwrap().inode;
    }
    ino
}

fn read(e: &Engine, layer: u64, path: &str) -> lcfs_engine::Result<Vec<u8>> {
    e.read(layer, ino(e, layer, path), 0, 64 << 20)
}

/// A frozen layer "img" mounted lazily from `r`.
fn mounted(e: &Arc<Engine>, r: &Registry, l: &Layer, background: bool) -> (Arc<Lazy>, u64) {
    let lazy = Lazy::start(e.clone(), config(r, background));
    let id = populated(e, &lazy, "img", &labels(r, &l.toc));
    (lazy, id)
}

/// A frozen layer `name` that `lazy` mounted from the layer `labels` name.
fn populated(e: &Engine, lazy: &Lazy, name: &str, labels: &BTreeMap<String, String>) -> u64 {
    let id = e.create_layer(name, true).unwrap();
    lazy.populate(name, labels).unwrap();
    e.commit_layer(name).unwrap();
    id
}

#[test]
fn a_lazy_layer_reads_right_and_costs_what_is_read() {
    let l = layer();
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, false);
    let after_mount = r.served();
    let a = e.getattr(id, ino(&e, id, "srv/big")).unwrap();
    assert_eq!((a.size, a.mode & 0o7777, a.uid), (3_000_000, 0o644, 7));
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO);
    assert_eq!(read(&e, id, "bin/hello-again").unwrap(), HELLO);
    assert_eq!(e.readlink(id, ino(&e, id, "bin/sh")).unwrap(), b"hello");
    let small = r.served() - after_mount;
    eprintln!(
        "blob {} bytes: mount {after_mount}, bin/hello {small}",
        l.blob.len()
    );
    assert!(after_mount + small < l.blob.len() as u64 / 10);
    // srv/big's 733 blocks and the landmark's one.
    assert_eq!(lazy.report()[0].absent_blocks, 734, "srv/big untouched");

    // A container cutting a file short inside a block not fetched yet.
    let t = e.clone_layer("img", "truncating").unwrap();
    let cut = lcfs_engine::SetAttr {
        size: Some(2_500_001),
        ..Default::default()
    };
    e.setattr(t, ino(&e, t, "srv/big"), &cut).unwrap();
    assert_eq!(read(&e, t, "srv/big").unwrap(), l.big[..2_500_001]);

    // A clone (a container) sees the content, and writes its own.
    let c = e.clone_layer("img", "container").unwrap();
    let big = ino(&e, c, "srv/big");
    e.write(c, big, 10, b"changed").unwrap();
    let mut want = l.big.clone();
    want[10..17].copy_from_slice(b"changed");
    assert_eq!(e.read(c, big, 0, 4 << 20).unwrap(), want);
    assert_eq!(
        read(&e, id, "srv/big").unwrap(),
        l.big,
        "the image is unchanged"
    );
    let report = e.fsck(true).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn wrong_chunks_and_a_registry_away_are_eio_within_the_bound_then_right() {
    let l = layer();
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, false);
    r.set(Serve::FlippedBefore(l.toc_offset));
    assert!(
        read(&e, id, "bin/hello").is_err(),
        "bytes that fail their digest"
    );
    r.set(Serve::Down);
    let t = Instant::now();
    let err = read(&e, id, "srv/big").unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    r.set(Serve::Ranges);
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO);
    assert_eq!(read(&e, id, "srv/big").unwrap(), l.big);
    assert!(lazy.report()[0].fetch_errors > 0);
}

#[test]
fn a_wrong_toc_digest_or_a_plain_layer_is_no_lazy_mount() {
    let l = layer();
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    e.create_layer("img", true).unwrap();
    let lazy = Lazy::start(e.clone(), config(&r, false));
    let wrong = format!("sha256:{}", "0".repeat(64));
    let why = lazy.populate("img", &labels(&r, &wrong)).unwrap_err();
    assert!(why.contains("the TOC hashes to"), "{why}");
    let mut plain = labels(&r, &l.toc);
    plain.remove(TOC_DIGEST_ANNOTATION);
    assert!(
        lazy.source(&plain).unwrap().is_none(),
        "no TOC digest: a normal pull"
    );
    assert!(lazy.report().is_empty());
}

#[test]
fn the_background_fetch_completes_a_layer_and_a_restart_takes_one_up() {
    let l = layer();
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, true);
    let t = Instant::now();
    while !lazy.report()[0].complete {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", lazy.report());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lazy.report()[0].absent_blocks, 0);
    r.set(Serve::Down);
    assert_eq!(
        read(&e, id, "srv/big").unwrap(),
        l.big,
        "served from the device"
    );
    assert!(e
        .layer_metadata("img")
        .unwrap()
        .contains_key("lcfs.lazy.done"));

    // An incomplete layer across a restart.
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (dev, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, false);
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO);
    e.sync().unwrap();
    lazy.stop();
    drop(lazy);
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, EngineConfig::default()).unwrap();
    r.set(Serve::Down);
    let lazy = Lazy::start(e.clone(), config(&r, false));
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO, "fetched before");
    assert!(
        read(&e, id, "srv/big").is_err(),
        "not fetched, the registry away"
    );
    r.set(Serve::Ranges);
    assert_eq!(read(&e, id, "srv/big").unwrap(), l.big);
    assert_eq!(
        lazy.report()[0].absent_blocks,
        1,
        "the landmark, never read"
    );
    assert!(e.fsck(true).unwrap().is_clean());
}

#[test]
fn chunks_that_cut_blocks_in_two_fill_them_whole() {
    // 10,000-byte chunks: most blocks lie across two chunks.
    let l = layer_chunked(10_000);
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, false);
    let big = ino(&e, id, "srv/big");
    assert_eq!(
        e.read(id, big, 40_000, 9000).unwrap(),
        l.big[40_000..49_000]
    );
    let (_, e2) = engine();
    let (lazy2, id2) = mounted(&e2, &r, &l, true);
    let t = Instant::now();
    while !lazy2.report()[0].complete {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{:?}",
            lazy2.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read(&e2, id2, "srv/big").unwrap(), l.big);
    assert!(lazy.report()[0].absent_blocks > 0);
}

#[test]
fn a_file_under_a_directory_symlink_is_where_the_applier_put_it() {
    // `lib` links to `srv`: `lib/via-link` lands in srv/, as a pull puts it.
    let mut b = tar::Builder::new(Vec::new());
    append_empty(&mut b, tar::EntryType::Directory, "srv/", "");
    append_empty(&mut b, tar::EntryType::Symlink, "lib", "srv");
    append_file(&mut b, "lib/via-link", HELLO, 0o644);
    let l = estargz_of(b.into_inner().unwrap(), 256 << 10, Vec::new());
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (_lazy, id) = mounted(&e, &r, &l, false);
    assert_eq!(read(&e, id, "srv/via-link").unwrap(), HELLO);
}

/// A free local address (bound and let go).
fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The cooperative pull's mirror on `e` at `at`: `r` its upstream for
/// `r`'s host, `peers` its peers.
fn mirror_at(
    e: &Arc<Engine>,
    at: std::net::SocketAddr,
    r: &Registry,
    peers: Vec<String>,
) -> lcfs_mirror::MirrorServer {
    let config = lcfs_mirror::Config {
        listen: at,
        cache_bytes: 64 << 20,
        upstreams: BTreeMap::from([(
            r.host().to_string(),
            lcfs_mirror::Upstream::plain(format!("http://{}", r.host())),
        )]),
        ca_certificates: Vec::new(),
        default_upstream: None,
        peers,
        peers_dns: None,
        self_address: Some(at.to_string()),
        token: Some("peers-token".into()),
        peer_timeout: Duration::from_secs(2),
        upstream_timeout: Duration::from_secs(5),
    };
    lcfs_mirror::serve(e.clone(), config).unwrap()
}

#[test]
fn reads_go_through_the_home_peer_and_past_one_that_sends_wrong_chunks() {
    let l = layer();
    let digest = format!(
        "sha256:{}",
        lcfs_engine::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&l.blob[..]))
    );
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let mut labels = labels(&r, &l.toc);
    labels.insert(LABEL_LAYER_DIGEST.to_string(), digest);

    // This host is the blob's home: its mirror serves the ranges (passed on
    // from the registry until its own download reaches them) and fetches
    // the blob whole for the cluster.
    let at = free_address();
    let m = mirror_at(&e, at, &r, vec![at.to_string()]);
    let mut c = config(&r, false);
    c.peers = Some(m.peers());
    let lazy = Lazy::start(e.clone(), c);
    let id = populated(&e, &lazy, "img", &labels);
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO);
    assert_eq!(read(&e, id, "srv/big").unwrap(), l.big);
    let rep = &lazy.report()[0];
    assert!(rep.peer_bytes > 0, "{rep:?}");
    assert_eq!(rep.peer_bytes, rep.fetched_bytes, "{rep:?}");
    // Each range was either passed on from the registry or, once the
    // mirror's own download of the blob had reached it, served from that:
    // which one depends on how fast the local registry sends the blob.
    let counters = m.counters.values();
    assert!(
        counters["ranges_passed"] + counters["served_to_peers"] >= 1,
        "{counters:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.counters.values()["blobs_from_upstream"] == 0 {
        assert!(
            Instant::now() < deadline,
            "the mirror did not cache the blob"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next layer of that blob reads from the mirror's cache: the
    // registry sends nothing more.
    let served = r.served();
    let again = populated(&e, &lazy, "img-again", &labels);
    assert_eq!(read(&e, again, "srv/big").unwrap(), l.big);
    assert_eq!(r.served(), served);
    lazy.stop();
    m.shutdown();

    // A home peer whose TOC is right and whose chunks are not: each read
    // fetches again from the registry, right, and the peer is left alone.
    let (_, e2) = engine();
    let wrong = registry(l.blob.clone(), Serve::FlippedBefore(l.toc_offset));
    let at = free_address();
    let m = mirror_at(&e2, at, &r, vec![wrong.host().to_string()]);
    let mut c = config(&r, false);
    c.peers = Some(m.peers());
    let lazy = Lazy::start(e2.clone(), c);
    let id = populated(&e2, &lazy, "img", &labels);
    assert_eq!(read(&e2, id, "bin/hello").unwrap(), HELLO);
    assert_eq!(read(&e2, id, "srv/big").unwrap(), l.big);
    assert!(m.counters.values()["fallbacks"] >= 1);
    lazy.stop();
    m.shutdown();
}

#[test]
fn reads_of_one_chunk_at_once_fetch_it_once() {
    let l = layer();
    let r = registry(l.blob.clone(), Serve::SlowRanges);
    let (_, e) = engine();
    let (lazy, id) = mounted(&e, &r, &l, false);
    let after_mount = r.served();
    let big = ino(&e, id, "srv/big");
    // As FUSE reads a file: several requests of 128 KiB at once.
    std::thread::scope(|s| {
        for piece in 0..8u64 {
            let e = &e;
            let want = &l.big;
            s.spawn(move || {
                let at = piece * (128 << 10);
                let got = e.read(id, big, at, 128 << 10).unwrap();
                assert_eq!(got, want[at as usize..at as usize + (128 << 10)]);
            });
        }
    });
    // Every chunk fetched once at most: no more than the layer's chunks
    // (the read-ahead of the first fetch covers them all, the other
    // reads wait for it).
    let fetched = r.served() - after_mount;
    assert!(
        fetched <= l.toc_offset as u64,
        "{fetched} bytes fetched; the layer's chunks are {} bytes",
        l.toc_offset
    );
    assert_eq!(lazy.report()[0].fetch_errors, 0);
}

#[test]
fn containerds_hosts_configuration_gives_the_server_its_header_and_mirrors() {
    use common::Auth;
    use std::os::unix::fs::PermissionsExt;
    let l = layer();
    let r = registry(l.blob.clone(), Serve::Ranges);
    r.require(Auth::Basic("puller:pw".into()));
    // A mirror whose TOC is right and whose chunks are not.
    let wrong = registry(l.blob.clone(), Serve::FlippedBefore(l.toc_offset));
    let hosts = tempfile::tempdir().unwrap();
    let (name, port) = r.host().rsplit_once(':').unwrap();
    let dir = hosts.path().join(format!("{name}_{port}_"));
    std::fs::create_dir(&dir).unwrap();
    // Basic base64("puller:pw").
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[header]\nAuthorization = \"Basic cHVsbGVyOnB3\"\n\n\
             [host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            r.host(),
            wrong.host()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.join("hosts.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (_, e) = engine();
    let mut c = config(&r, false);
    c.registries.clear();
    c.hosts_dir = Some(hosts.path().to_path_buf());
    let lazy = Lazy::start(e.clone(), c);
    let id = populated(&e, &lazy, "img", &labels(&r, &l.toc));
    assert!(wrong.served() > 0, "the mirror was asked first");
    assert_eq!(read(&e, id, "bin/hello").unwrap(), HELLO);
    assert_eq!(read(&e, id, "srv/big").unwrap(), l.big);
    assert!(lazy.report()[0]
        .blob
        .starts_with(&format!("http://{}/v2/t/", r.host())));

    // A hosts file others can write is refused: no lazy mount, said why.
    std::fs::set_permissions(
        dir.join("hosts.toml"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let e = lazy.source(&labels(&r, &l.toc)).err().unwrap();
    assert!(e.contains("only root can write"), "{e}");
}

#[test]
fn the_background_fetch_takes_the_files_containers_read_first() {
    use rand::RngCore;
    // Three files of 2 MiB that do not compress, in this order.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(19);
    let mut b = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    for name in ["a", "b", "c"] {
        let mut data = vec![0u8; 2 << 20];
        rng.fill_bytes(&mut data);
        append_file(&mut b, name, &data, 0o644);
        files.push(data);
    }
    let l = estargz_of(b.into_inner().unwrap(), 256 << 10, Vec::new());
    let ix = Index::open(&mut Cursor::new(&l.blob[..])).unwrap();
    let c = ix.by_name["c"];
    let c_span = ix
        .chunks
        .iter()
        .filter(|k| k.entry == c)
        .fold((u64::MAX, 0), |(lo, hi), k| {
            (lo.min(k.start), hi.max(k.end))
        });
    let r = registry(l.blob.clone(), Serve::Ranges);
    let (_, e) = engine();
    let (lazy, _) = mounted(&e, &r, &l, false);
    // A container reads the start of c (its first chunks are fetched).
    let ctr = e.clone_layer("img", "ctr").unwrap();
    let got = e.read_counted(ctr, ino(&e, ctr, "c"), 0, 4096).unwrap();
    assert_eq!(got, files[2][..4096]);
    lazy.stop();
    drop(lazy);

    // Taken up again with the background fetch: the rest of c comes first.
    r.ranges.lock().unwrap().clear();
    let lazy = Lazy::start(e.clone(), config(&r, true));
    let t = Instant::now();
    while !lazy.report().first().is_some_and(|l| l.complete) {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", lazy.report());
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = r.ranges.lock().unwrap().clone();
    let first_chunks = asked
        .iter()
        .find(|(start, _)| (*start as u64) < ix.toc_offset)
        .copied()
        .unwrap();
    assert!(
        (c_span.0..c_span.1).contains(&(first_chunks.0 as u64)),
        "the first range fetched, {first_chunks:?}, is not of c ({c_span:?}); all: {asked:?}"
    );
    for (name, data) in ["a", "b", "c"].iter().zip(&files) {
        assert_eq!(&read(&e, ctr, name).unwrap(), data, "{name}");
    }
}
