//! The guest's RAM outside its migration stream. A saved guest runs with its RAM in a file
//! (`memory-backend-file`, `share=on`), and QEMU saves it with the `x-ignore-shared` migration
//! capability: the state file then holds the devices alone, and the RAM stays in the file.
//! A revive maps a RAM file privately and read-only (`share=off,readonly=on,rom=off`, QEMU
//! 8.2 and later): the guest's pages load from the file as it touches them, so a revive takes
//! the same time whatever the memory holds, and every VM revived from one file shares its
//! unchanged pages through the page cache (QEMU's vm-templating document describes the pair).
//!
//! In an image the RAM is a memory file ([`MEMORY_FILE`]): its pages as records
//! ([`crate::format::memory`]), framed and compressed as a state file is. An image made from
//! media lists its pages that are not zero; a layer lists the pages that differ from its
//! base's memory. A build maps the RAM file expanded from the image at the bottom of the
//! chain ([`expand`]) and writes the layers' pages into QEMU before the guest runs
//! ([`apply_to_process`]).

pub use crate::format::memory::PAGE;
use crate::format::memory::{is_zero, PageSink, PageWriter};
use crate::format::state::{self as frame, FrameError};
use crate::vm::sys::os;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An image's memory file.
pub const MEMORY_FILE: &str = "memory";
/// The expanded RAM file: a memory stage's output holds it, as does a session's work folder
/// when it made its own.
pub const RAM_FILE: &str = "ram";
/// The memory backend's id on QEMU's command line.
pub const BACKEND_ID: &str = "guest-ram";

/// What a memory file says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemoryHeader {
    /// The guest's memory size.
    pub memory_mib: u32,
    /// How many page records follow.
    pub pages: u64,
    /// The pages that differ from the base's memory (a layer's); otherwise those not zero.
    pub layer: bool,
}

/// Where a VM's RAM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRam {
    /// QEMU's own anonymous memory (a cold boot that is not saved, the controller).
    Anonymous,
    /// In this file, shared: what the guest writes goes into it, and a save with
    /// `x-ignore-shared` leaves the RAM there. QEMU makes the file if it is missing.
    Shared(PathBuf),
    /// Mapped from this file, privately and read-only: the file is never written.
    Private(PathBuf),
}

impl GuestRam {
    /// QEMU's memory backend object for `memory_mib` of this RAM, if it is a file.
    pub fn backend(&self, memory_mib: u32) -> Option<String> {
        let (path, mode) = match self {
            GuestRam::Anonymous => return None,
            GuestRam::Shared(p) => (p, "share=on"),
            GuestRam::Private(p) => (p, "share=off,readonly=on,rom=off"),
        };
        Some(format!(
            "memory-backend-file,id={BACKEND_ID},size={memory_mib}M,mem-path={},{mode}",
            crate::vm::qemu::option_path(path)
        ))
    }

    /// Whether the RAM is left out of a save (and so out of the state a revive loads).
    pub fn outside_the_stream(&self) -> bool {
        !matches!(self, GuestRam::Anonymous)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "memory file {} holds {saved} MiB of memory, but the image's guest has {wanted} MiB: the image is damaged; build it again (nix-store --repair-path {})",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    SizeMismatch { path: PathBuf, saved: u32, wanted: u32 },
    #[error("memory file {} lists page {index}, beyond the guest's {memory_mib} MiB: the image is damaged", path.display())]
    PageOutside { path: PathBuf, index: u64, memory_mib: u32 },
    #[error(
        "memory file {} is {}, where {} was expected",
        path.display(),
        if *layer { "a layer's" } else { "a whole memory" },
        if *layer { "a whole memory" } else { "a layer's" }
    )]
    WrongKind { path: PathBuf, layer: bool },
    #[error("QEMU (pid {pid}) has no mapping of the RAM file {}: its memory backend is not that file", path.display())]
    NotMapped { pid: i32, path: PathBuf },
    #[error(
        "writing the layers' memory pages into QEMU (pid {pid}) through /proc/{pid}/mem failed: {source}; the kernel allows a process to write into its own child unless kernel.yama.ptrace_scope is 2 or 3 ({scope})"
    )]
    ProcessWrite { pid: i32, source: io::Error, scope: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io { what, path: path.to_path_buf(), source }
}

fn pages_of(memory_mib: u32) -> u64 {
    u64::from(memory_mib) * (1 << 20) / PAGE as u64
}

/// Reads a memory file's header and checks its frame, its kind and its size; the pages not read.
pub fn inspect(path: &Path, memory_mib: u32, layer: bool) -> Result<MemoryHeader, MemoryError> {
    let info = frame::inspect(path, |h: &MemoryHeader| check(path, h, memory_mib, layer))?;
    Ok(info.header)
}

fn check(path: &Path, h: &MemoryHeader, memory_mib: u32, layer: bool) -> Result<(), MemoryError> {
    if h.memory_mib != memory_mib {
        return Err(MemoryError::SizeMismatch { path: path.into(), saved: h.memory_mib, wanted: memory_mib });
    }
    if h.layer != layer {
        return Err(MemoryError::WrongKind { path: path.into(), layer: h.layer });
    }
    Ok(())
}

/// Streams `path`'s pages to `page`, checked as they go (frame, kind, size, each index); the
/// number of pages. A file that fails a check has had some pages handed over: the caller
/// discards what it made of them.
fn each_page(
    path: &Path,
    memory_mib: u32,
    layer: bool,
    mut page: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<u64, MemoryError> {
    let limit = pages_of(memory_mib);
    let mut outside = None;
    let mut sink = PageSink::new(|index, bytes: &[u8]| {
        if index >= limit {
            outside = Some(index);
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a page beyond the memory"));
        }
        page(index, bytes)
    });
    let read = frame::read(path, |h: &MemoryHeader| check(path, h, memory_mib, layer), &mut sink);
    let finished = sink.finish();
    if let Some(index) = outside {
        return Err(MemoryError::PageOutside { path: path.into(), index, memory_mib });
    }
    let info = read?;
    let pages = finished.map_err(|e| FrameError::Corrupt { path: path.into(), detail: e.to_string() })?;
    if pages != info.header.pages {
        let detail = format!("it holds {pages} pages, not the recorded {}", info.header.pages);
        return Err(FrameError::Corrupt { path: path.into(), detail }.into());
    }
    Ok(pages)
}

/// How many page records `layers` (memory files of layers) hold in all, from their headers.
pub fn pages_in(layers: &[PathBuf], memory_mib: u32) -> Result<u64, MemoryError> {
    layers.iter().map(|l| inspect(l, memory_mib, true).map(|h| h.pages)).sum()
}

/// Streams the pages of `layers` (memory files, bottom first) to `page`: a later page of the
/// same index comes later, and so wins when written in turn.
fn each_layer_page(
    layers: &[PathBuf],
    memory_mib: u32,
    mut page: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<u64, MemoryError> {
    let mut pages = 0;
    for layer in layers {
        pages += each_page(layer, memory_mib, true, &mut page)?;
    }
    Ok(pages)
}

/// Saves the RAM file `ram` (a guest of `memory_mib`) into the memory file `out`: its pages
/// that are not zero, or, given the RAM file it started from (`base`: its base's memory put
/// together), those that differ from it. The header written.
pub fn save(ram: &Path, memory_mib: u32, base: Option<&Path>, out: &Path) -> Result<MemoryHeader, MemoryError> {
    let total = u64::from(memory_mib) << 20;
    let open = |path: &Path| -> Result<BufReader<File>, MemoryError> {
        let file = File::open(path).map_err(io_err("opening the RAM file", path))?;
        let len = file.metadata().map_err(io_err("reading the size of", path))?.len();
        if len != total {
            let source = io::Error::new(io::ErrorKind::InvalidData, format!("it has {len} bytes, not {total}"));
            return Err(MemoryError::Io { what: "saving the RAM file", path: path.into(), source });
        }
        Ok(BufReader::with_capacity(1 << 20, file))
    };
    let mut reader = open(ram)?;
    let mut below = base.map(open).transpose()?;
    // The kept pages are gathered in a scratch file first: the header, written before them,
    // counts them.
    let scratch = tempfile::tempfile_in(out.parent().unwrap_or(Path::new(".")))
        .map_err(io_err("making a scratch file beside", out))?;
    let mut records = PageWriter::new(io::BufWriter::with_capacity(1 << 20, scratch));
    let (mut page, mut under) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    for index in 0..total / PAGE as u64 {
        reader.read_exact(&mut page).map_err(io_err("reading", ram))?;
        let keep = match (&mut below, base) {
            (Some(b), Some(path)) => {
                b.read_exact(&mut under).map_err(io_err("reading", path))?;
                page != under
            }
            _ => !is_zero(&page),
        };
        if keep {
            records.put(index, &page).map_err(io_err("writing a scratch file for", out))?;
        }
    }
    let pages = records.pages();
    let mut scratch = records.into_inner().into_inner().map_err(|e| MemoryError::Io {
        what: "writing a scratch file for",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    scratch.seek(SeekFrom::Start(0)).map_err(io_err("reading back the scratch file of", out))?;
    let header = MemoryHeader { memory_mib, pages, layer: base.is_some() };
    frame::write(out, &header, &mut BufReader::with_capacity(1 << 20, scratch))?;
    Ok(header)
}

/// Expands the memory file `memory` (a whole memory) into a new RAM file `out`: sparse, its zero
/// pages holes. Made under a temporary name, renamed into place when whole.
pub fn expand(memory: &Path, memory_mib: u32, out: &Path) -> Result<u64, MemoryError> {
    let partial = out.with_extension("partial");
    let file = File::create(&partial).map_err(io_err("creating", &partial))?;
    file.set_len(u64::from(memory_mib) << 20).map_err(io_err("sizing", &partial))?;
    let pages = each_page(memory, memory_mib, false, |index, bytes| file.write_all_at(bytes, index * PAGE as u64));
    let pages = match pages {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(io_err("renaming into place", out))?;
    Ok(pages)
}

/// Copies the RAM file `from` to `to`, its holes left holes (found with SEEK_DATA), then writes
/// the pages of `layers` (memory files, bottom first) into the copy: the memory of the image at
/// the top of those layers, put together. Made under a temporary name, renamed when whole.
pub fn compose(from: &Path, layers: &[PathBuf], memory_mib: u32, to: &Path) -> Result<u64, MemoryError> {
    let partial = to.with_extension("partial");
    let made = (|| {
        let mut src = File::open(from).map_err(io_err("opening", from))?;
        let len = src.metadata().map_err(io_err("reading the size of", from))?.len();
        let mut dst = File::create(&partial).map_err(io_err("creating", &partial))?;
        dst.set_len(len).map_err(io_err("sizing", &partial))?;
        let mut at = 0u64;
        while at < len {
            let Some(data) = os::seek_data(&src, at, false) else { break };
            let hole = os::seek_data(&src, data, true).unwrap_or(len);
            src.seek(SeekFrom::Start(data)).map_err(io_err("seeking in", from))?;
            dst.seek(SeekFrom::Start(data)).map_err(io_err("seeking in", &partial))?;
            io::copy(&mut (&mut src).take(hole - data), &mut dst)
                .map_err(io_err("copying the RAM file into", &partial))?;
            at = hole;
        }
        each_layer_page(layers, memory_mib, |index, page| dst.write_all_at(page, index * PAGE as u64))
    })();
    match made {
        Ok(pages) => {
            std::fs::rename(&partial, to).map_err(io_err("renaming into place", to))?;
            Ok(pages)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Writes the pages of `layers` (memory files, bottom first) into the RAM of QEMU `pid`, whose
/// memory backend maps `mapped` (privately): through /proc/PID/mem at the mapping's address,
/// as they are read. The guest must not run yet. The number of pages written.
pub fn apply_to_process(pid: i32, mapped: &Path, layers: &[PathBuf], memory_mib: u32) -> Result<u64, MemoryError> {
    if layers.is_empty() {
        return Ok(0);
    }
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&maps_path).map_err(io_err("reading", &maps_path))?;
    let want = std::fs::canonicalize(mapped).unwrap_or_else(|_| mapped.to_path_buf());
    let areas = mappings_of(&maps, &want);
    if areas.is_empty() {
        return Err(MemoryError::NotMapped { pid, path: mapped.to_path_buf() });
    }
    let denied = |source| MemoryError::ProcessWrite {
        pid,
        source,
        scope: std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .map_or_else(|_| "no Yama here".to_owned(), |s| format!("it is {} here", s.trim())),
    };
    let mem = std::fs::OpenOptions::new().write(true).open(format!("/proc/{pid}/mem")).map_err(denied)?;
    let mut unmapped = false;
    let mut failed = None;
    let pages = each_layer_page(layers, memory_mib, |index, page| {
        let offset = index * PAGE as u64;
        let Some(area) = areas.iter().find(|a| offset >= a.offset && offset + PAGE as u64 <= a.offset + a.len) else {
            unmapped = true;
            return Err(io::Error::other("a page outside the mapping"));
        };
        mem.write_all_at(page, area.start + (offset - area.offset)).map_err(|e| {
            failed = Some(io::Error::new(e.kind(), e.to_string()));
            e
        })
    });
    if unmapped {
        return Err(MemoryError::NotMapped { pid, path: mapped.to_path_buf() });
    }
    if let Some(e) = failed {
        return Err(denied(e));
    }
    pages
}

/// One mapping of a file in a process: its address, length and file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Area {
    start: u64,
    len: u64,
    offset: u64,
}

/// The mappings of `path` in a `/proc/PID/maps` text.
fn mappings_of(maps: &str, path: &Path) -> Vec<Area> {
    let path = path.to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ' ');
            let range = f.next()?;
            let _perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let rest = f.next()?;
            let name = f.next().unwrap_or(rest).trim();
            if name != path {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (start, end) = (u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?);
            Some(Area { start, len: end - start, offset })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    /// A RAM file of 1 MiB (256 pages) with pages 3 and 200 written.
    fn ram(dir: &Path, name: &str, pages: &[(u64, u8)]) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        for (i, fill) in pages {
            f.write_all_at(&page(*fill), i * PAGE as u64).unwrap();
        }
        p
    }

    /// A whole memory keeps the pages that are not zero, and expands to the same bytes with its
    /// zero pages as holes.
    #[test]
    fn a_memory_saved_and_expanded_is_the_same_memory() {
        let d = scratch();
        let ram = ram(d.path(), "ram", &[(3, 7), (200, 9)]);
        let mem = d.path().join("memory");
        let h = save(&ram, 1, None, &mem).unwrap();
        assert_eq!(h, MemoryHeader { memory_mib: 1, pages: 2, layer: false });
        let out = d.path().join("expanded");
        assert_eq!(expand(&mem, 1, &out).unwrap(), 2);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&ram).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 1 << 20, "the zero pages are holes");
    }

    /// A layer keeps only the pages that differ from the memory it started from, a page zeroed
    /// since included; put together over the base, the layers give the top layer's memory.
    #[test]
    fn a_layer_keeps_only_what_differs_from_its_base() {
        let d = scratch();
        let base = ram(d.path(), "base", &[(3, 7), (200, 9)]);
        // The first layer: page 3 zeroed, 200 the same, 10 new.
        let top = ram(d.path(), "top", &[(200, 9), (10, 4)]);
        let l1 = d.path().join("l1");
        let h = save(&top, 1, Some(&base), &l1).unwrap();
        assert_eq!(h, MemoryHeader { memory_mib: 1, pages: 2, layer: true });
        let work = d.path().join("work");
        assert_eq!(compose(&base, std::slice::from_ref(&l1), 1, &work).unwrap(), 2);
        assert_eq!(std::fs::read(&work).unwrap(), std::fs::read(&top).unwrap(), "base and layer put together");
        // A second layer on it: only page 11, and page 10 written again with the same bytes.
        let below = d.path().join("below");
        compose(&work, &[], 1, &below).unwrap();
        let f = File::options().write(true).open(&work).unwrap();
        f.write_all_at(&page(5), 11 * PAGE as u64).unwrap();
        f.write_all_at(&page(4), 10 * PAGE as u64).unwrap();
        let l2 = d.path().join("l2");
        assert_eq!(save(&work, 1, Some(&below), &l2).unwrap().pages, 1);
        assert_eq!(pages_in(&[l1.clone(), l2.clone()], 1).unwrap(), 3);
        let again = d.path().join("again");
        compose(&base, &[l1, l2], 1, &again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&work).unwrap());
    }

    #[test]
    fn a_memory_file_of_another_size_or_kind_is_refused() {
        let d = scratch();
        let ram = ram(d.path(), "ram", &[(1, 1)]);
        let mem = d.path().join("memory");
        save(&ram, 1, None, &mem).unwrap();
        let e = expand(&mem, 2, &d.path().join("x")).unwrap_err();
        assert!(e.to_string().contains("holds 1 MiB of memory, but the image's guest has 2 MiB"), "{e}");
        assert!(!d.path().join("x").exists() && !d.path().join("x.partial").exists());
        let e = pages_in(std::slice::from_ref(&mem), 1).unwrap_err();
        assert!(e.to_string().contains("is a whole memory, where a layer's was expected"), "{e}");
        let e = compose(&ram, &[mem], 1, &d.path().join("y")).unwrap_err();
        assert!(e.to_string().contains("is a whole memory, where a layer's was expected"), "{e}");
        assert!(!d.path().join("y").exists() && !d.path().join("y.partial").exists());
    }

    /// A damaged memory file is refused by its checksum, and leaves no RAM file behind.
    #[test]
    fn a_corrupt_memory_file_is_refused() {
        let d = scratch();
        let ram = ram(d.path(), "ram", &[(1, 1), (2, 2)]);
        let mem = d.path().join("memory");
        save(&ram, 1, None, &mem).unwrap();
        let mut bytes = std::fs::read(&mem).unwrap();
        // A byte of the payload, before the trailer.
        let at = bytes.len() - frame::TRAILER_LEN as usize - 3;
        bytes[at] ^= 0xff;
        std::fs::write(&mem, bytes).unwrap();
        let out = d.path().join("out");
        let e = expand(&mem, 1, &out).unwrap_err();
        assert!(e.to_string().contains("is corrupt"), "{e}");
        assert!(!out.exists() && !out.with_extension("partial").exists());
    }

    #[test]
    fn mappings_are_found_by_path() {
        let maps = "\
7f0000000000-7f0040000000 rw-p 00000000 fe:01 123   /nix/store/x-memory/ram
7f0040000000-7f0080000000 rw-p 40000000 fe:01 123   /nix/store/x-memory/ram
7f0080000000-7f0080001000 r--p 00000000 fe:01 9     /usr/lib/libc.so
";
        let a = mappings_of(maps, Path::new("/nix/store/x-memory/ram"));
        assert_eq!(
            a,
            vec![
                Area { start: 0x7f0000000000, len: 0x40000000, offset: 0 },
                Area { start: 0x7f0040000000, len: 0x40000000, offset: 0x40000000 }
            ]
        );
    }

    /// The pages reach a real child's private mapping of a file, and the file is untouched.
    #[test]
    fn pages_are_written_into_a_childs_private_mapping() {
        // A real QEMU, stopped (-S), whose 16 MiB of RAM map a file privately and read-only,
        // as a revived guest's do; its monitor then saves guest page 5 (physical 0x5000, in
        // the PC's low RAM: the file's page 5) into a file.
        let d = scratch();
        let file = d.path().join("ram");
        let f = File::create(&file).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&page(1), 0).unwrap();
        drop(f);
        let qemu = crate::tools::Tools::find().map(|t| t.qemu).unwrap_or_else(|_| "qemu-system-x86_64".into());
        let backend = GuestRam::Private(file.clone()).backend(16).unwrap();
        let mut child = std::process::Command::new(qemu)
            .args(["-machine", &format!("pc,accel=tcg,memory-backend={BACKEND_ID}"), "-m", "16", "-S"])
            .args(["-object", &backend, "-nodefaults", "-display", "none", "-monitor", "stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("QEMU (the machine's) runs this test");
        let pid = child.id() as i32;
        let canonical = std::fs::canonicalize(&file).unwrap();
        let start = std::time::Instant::now();
        while mappings_of(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default(), &canonical)
            .is_empty()
        {
            assert!(start.elapsed().as_secs() < 30, "QEMU never mapped its RAM file");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A layer whose page 5 holds 42s.
        let top = d.path().join("top");
        compose(&file, &[], 16, &top).unwrap();
        File::options().write(true).open(&top).unwrap().write_all_at(&page(42), 5 * PAGE as u64).unwrap();
        let layer = d.path().join("layer");
        save(&top, 16, Some(&file), &layer).unwrap();
        assert_eq!(apply_to_process(pid, &file, std::slice::from_ref(&layer), 16).unwrap(), 1);
        let saved = d.path().join("page5");
        let monitor = format!("pmemsave 0x5000 4096 \"{}\"\nquit\n", saved.display());
        io::Write::write_all(child.stdin.as_mut().unwrap(), monitor.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(&saved).unwrap(), page(42), "the guest sees the page written");
        assert_eq!(std::fs::read(&file).unwrap()[5 * PAGE], 0, "the file itself is not written");
        let e = apply_to_process(std::process::id() as i32, &d.path().join("none"), &[layer], 1).unwrap_err();
        assert!(e.to_string().contains("has no mapping of the RAM file"), "{e}");
    }
}
