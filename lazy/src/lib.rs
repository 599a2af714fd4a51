//! Lazy pull (docs/lazy.md). This first part is the seekable layer format
//! lazily mounted layers are read in: eStargz, written by [`estargz::build`]
//! (the `lcfs estargz build` tooling) and read and verified by
//! [`estargz::Index`], compatible both ways with the reference
//! implementation (containerd's stargz-snapshotter `estargz` package);
//! [`image::convert`] rewrites a whole image's layers so, and
//! [`remote::RemoteLayer`] reads a file of a layer in a registry with
//! ranged requests only, as a lazy mount's first read will.

pub mod estargz;
pub mod image;
pub mod mount;
pub mod remote;
pub mod skeleton;
pub mod time;
