//! The engine end to end on a device file: format, import a host directory as
//! an image layer, clone containers from it (O(1)), change one, commit it,
//! reopen the device and verify everything, then print the engine's numbers.
//!
//! Usage: demo DEVICE [SOURCE_DIR]   (SOURCE_DIR defaults to /usr/share/doc)

use lcfs_engine::device::{open_device, OpenOptions};
use lcfs_engine::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn import(
    e: &Engine,
    layer: u64,
    dir: u64,
    src: &Path,
    files: &mut u64,
    bytes: &mut u64,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(src)?.filter_map(|d| d.ok()).collect();
    entries.sort_by_key(|d| d.file_name());
    for ent in entries {
        let name = ent.file_name();
        let name = name.as_encoded_bytes();
        let meta = std::fs::symlink_metadata(ent.path())?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            let d = e.mkdir(layer, dir, name, mode, meta.uid(), meta.gid())?;
            import(e, layer, d.inode, &ent.path(), files, bytes)?;
        } else if ft.is_symlink() {
            let t = std::fs::read_link(ent.path())?;
            e.symlink(
                layer,
                dir,
                name,
                t.as_os_str().as_encoded_bytes(),
                meta.uid(),
                meta.gid(),
            )?;
        } else if ft.is_file() {
            let f = e.create(layer, dir, name, mode, meta.uid(), meta.gid())?;
            let data = std::fs::read(ent.path())?;
            if !data.is_empty() {
                e.write(layer, f.inode, 0, &data)?;
            }
            *files += 1;
            *bytes += data.len() as u64;
        }
    }
    Ok(())
}

fn path_inode(e: &Engine, layer: u64, path: &str) -> Result<u64> {
    let mut ino = ROOT_INODE;
    for p in path.split('/').filter(|p| !p.is_empty()) {
        ino = e.lookup(layer, ino, p.as_bytes())?.inode;
    }
    Ok(ino)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(device) = args.get(1) else {
        eprintln!("usage: demo DEVICE [SOURCE_DIR]");
        std::process::exit(2);
    };
    let source = args.get(2).map(String::as_str).unwrap_or("/usr/share/doc");
    let open = || -> Result<Arc<dyn device::Device>> {
        Ok(Arc::from(open_device(
            Path::new(device),
            &OpenOptions::default(),
        )?))
    };

    let dev = open()?;
    println!(
        "device {device}: {} MiB, I/O backend {}",
        dev.size_bytes() >> 20,
        dev.backend()
    );
    Engine::format(
        dev.clone(),
        &FormatOptions {
            force: true,
            ..Default::default()
        },
    )?;
    let e = Engine::open(dev, Config::default())?;

    let t = Instant::now();
    let image = e.create_layer("debian-doc", true)?;
    let (mut files, mut bytes) = (0, 0);
    import(
        &e,
        image,
        ROOT_INODE,
        Path::new(source),
        &mut files,
        &mut bytes,
    )?;
    e.sync()?;
    println!(
        "imported {source}: {files} files, {} KiB in {:.2?} into layer debian-doc",
        bytes >> 10,
        t.elapsed()
    );

    let t = Instant::now();
    for i in 0..10 {
        e.clone_layer("debian-doc", &format!("container-{i}"))?;
    }
    println!(
        "cloned 10 containers in {:.2?} (each clone is O(1): no data is copied)",
        t.elapsed()
    );

    let c0 = e.layer_id("container-0")?;
    let note = e.create(c0, ROOT_INODE, b"hello.txt", 0o644, 0, 0)?;
    e.write(c0, note.inode, 0, b"written inside container-0\n")?;
    let first = e.readdir(image, ROOT_INODE, 0, 1)?;
    if let Some(victim) = first.first() {
        if victim.kind != FileKind::Directory {
            e.unlink(c0, ROOT_INODE, &victim.name)?;
        }
    }
    let t = Instant::now();
    e.commit_layer("container-0")?;
    e.clone_layer("container-0", "container-0-next")?;
    println!(
        "committed container-0 and started a container from it in {:.2?}",
        t.elapsed()
    );
    e.sync()?;
    e.close()?;
    let before = e.stats();
    drop(e);

    // Reopen from the device: everything synced must be there.
    let e = Engine::open(open()?, Config::default())?;
    let next = e.layer_id("container-0-next")?;
    let hello = path_inode(&e, next, "/hello.txt")?;
    let text = e.read(next, hello, 0, 100)?;
    print!(
        "after reopen, container-0-next/hello.txt: {}",
        String::from_utf8_lossy(&text)
    );
    let c5 = e.layer_id("container-5")?;
    assert!(
        e.lookup(c5, ROOT_INODE, b"hello.txt").is_err(),
        "other containers do not see it"
    );
    let report = e.fsck(true)?;
    println!(
        "fsck: {} ({} layers, {} inodes, {} tree nodes, {} data blocks verified)",
        if report.is_clean() {
            "clean"
        } else {
            "PROBLEMS"
        },
        report.layers,
        report.inodes,
        report.tree_nodes,
        report.data_blocks_verified
    );
    for err in report.errors.iter().take(5) {
        println!("  {err}");
    }
    println!("\nlayers:");
    for l in e.list_layers() {
        println!(
            "  {:<18} parent {:<12} {:<8} owns {:>8} KiB, {:>6} inodes",
            l.name,
            l.parent.as_deref().unwrap_or("-"),
            if l.frozen { "frozen" } else { "writable" },
            l.owned_bytes >> 10,
            l.inode_count
        );
    }
    let s = before;
    println!("\nengine stats (first run):");
    println!(
        "  user writes: {} calls, {} KiB",
        s.engine.user_write_calls,
        s.engine.user_write_bytes >> 10
    );
    println!(
        "  device writes: {} ({} KiB), flushes {}: {:.1} user writes per device write",
        s.device.writes,
        s.device.write_bytes >> 10,
        s.device.flushes,
        s.coalescing_ratio()
    );
    println!(
        "  checkpoints: {}, live data {} KiB of {} MiB",
        s.engine.checkpoints,
        s.live_bytes >> 10,
        s.capacity_bytes >> 20
    );
    println!(
        "  node cache: {} hits, {} misses",
        s.node_cache_hits, s.node_cache_misses
    );
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}
