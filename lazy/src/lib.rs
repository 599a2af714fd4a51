//! Lazy pull (docs/lazy.md): the seekable layer format lazily mounted
//! layers are read in, eStargz, written by [`estargz::build`] (the `lcfs
//! estargz build` tooling) and read and verified by [`estargz::Index`],
//! compatible both ways with the reference implementation (containerd's
//! stargz-snapshotter `estargz` package); [`image::convert`] rewrites a
//! whole image's layers so; [`remote::RemoteLayer`] reads a layer in a
//! registry with ranged requests only; [`mount::Lazy`] mounts a layer from
//! its TOC and fetches its content on first read and in the background,
//! reaching registries as [`hosts`] (containerd's hosts configuration) or
//! its own configuration says.

pub mod estargz;
pub mod hosts;
pub mod image;
pub mod mount;
pub mod remote;
pub mod skeleton;
pub mod time;
