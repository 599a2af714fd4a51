//! Generates the snapshots, diff, content, leases, images and namespaces
//! APIs from the vendored containerd 1.7.24 .proto files with protox (a
//! protobuf compiler in Rust), so building needs no protoc. The vendored
//! files are containerd's verbatim but for their imports of containerd's
//! own types (`github.com/containerd/containerd/api/types/x.proto` becomes
//! `types/x.proto`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The services first; the types they import follow.
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/services/diff/v1/diff.proto",
        "proto/containerd/services/content/v1/content.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/containerd/services/images/v1/images.proto",
        "proto/containerd/services/namespaces/v1/namespace.proto",
        "proto/containerd/types/mount.proto",
        "proto/containerd/types/descriptor.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut descriptors = protox::compile(&files[..6], ["proto/containerd", "proto"])?;
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
