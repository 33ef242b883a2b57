//! The controller's and the standin guest's initramfs, built by our own code: the archive
//! (written as cpio newc by [`crate::format::cpio`]), the shared-library closure of the
//! binaries it carries, and the load order of the kernel modules it needs.

mod archive;
mod closure;
pub mod linux;
mod modules;

pub use archive::{Initramfs, InitramfsError};
pub use modules::module_closure;

#[cfg(test)]
mod tests;
