//! Generates the snapshots API from the vendored containerd .proto files
//! with protox (a protobuf compiler in Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/types/mount.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut descriptors = protox::compile(&files[..1], ["proto/containerd", "proto"])?;
    // containerd's comments hold indented lines that rustdoc would run as
    // tests; the .proto files stay the documentation.
    for file in &mut descriptors.file {
        file.source_code_info = None;
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
