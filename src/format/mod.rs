//! The file formats the program reads and writes, as pure codecs: bytes in, values out, and
//! back. Each knows its format and nothing of the VMs, the guests or the stages that use it,
//! so this module imports nothing from the rest of the crate; the layers above give the
//! formats their meaning (which file of an ISO matters, where an archive's entries may go).
//!
//! - `iso`: ISO 9660 (with Joliet) and UDF, read-only: find a file in a disc image, read it.
//! - `wim`: a WIM's header and its XML image list.
//! - `fat`: which FAT a boot sector holds.
//! - `mbr`: a master boot record with one partition, written.
//! - `cpio`: the "newc" archive entries an initramfs is made of, written.
//! - `elf`: ELF64 little-endian: program headers, the dynamic section, sections.
//! - `tar`: ustar, GNU and pax archives, read as a stream.
//! - `pcap`: the classic capture file, written.
//! - `ppm`, `png`: QEMU's screen dumps read; PNG written and read.
//! - `md4`: the digest under the NT password hash.
//! - `state`: the framing of a saved VM state file, generic over its header.
//! - `memory`: a guest's memory as page records, the payload of a memory file.

pub mod cpio;
pub mod elf;
pub mod fat;
pub mod iso;
pub mod mbr;
pub mod md4;
pub mod memory;
pub mod pcap;
pub mod png;
pub mod ppm;
pub mod state;
pub mod tar;
pub mod wim;

/// What the codecs' tests share; the crate's own helpers are above this module, out of reach.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh scratch file path; the caller removes it.
    pub fn temp_path(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!("nix-winvm-format-test-{}-{n}-{name}", std::process::id()))
    }

    /// Whether `tool` is on PATH. A missing tool skips the test, and says so, unless
    /// NIX_WINVM_REQUIRE_TOOLS=1 (scripts/test sets it), as `tools::test_requires` does.
    pub fn tool_available(tool: &str) -> bool {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool} >/dev/null 2>&1"))
            .status()
            .is_ok_and(|status| status.success());
        if found {
            return true;
        }
        if std::env::var_os("NIX_WINVM_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
            panic!("this test needs {tool}, which is missing (NIX_WINVM_REQUIRE_TOOLS=1)");
        }
        eprintln!("skipped: {tool} is missing");
        false
    }
}
