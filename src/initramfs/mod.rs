//! The controller's and the standin guest's initramfs, built by our own code: a cpio newc
//! writer, the shared-library closure of the binaries it carries, and the load order of the
//! kernel modules it needs.

mod cpio;
mod elf;
pub mod linux;
mod modules;

pub use cpio::{Initramfs, InitramfsError};
pub use elf::{default_lib_dirs, elf_closure, ElfError, DEFAULT_LIB_DIRS};
pub use modules::{module_closure, module_depends, normalize_module_name, ModuleError};

#[cfg(test)]
mod tests;
