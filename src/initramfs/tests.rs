use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::closure::{default_lib_dirs, elf_closure, ElfError};
use super::modules::{module_depends, normalize_module_name, ModuleError};
use super::*;

const KERNEL_DIR: &str = "/var/cache/nix-winvm/kernel";
const DROPBEAR: &str = "/usr/sbin/dropbear";
const BUSYBOX: &str = "/bin/busybox";

/// One entry of a newc archive as our own test reader sees it.
#[derive(Debug)]
struct RawEntry {
    offset: usize,
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    name: String,
    data: Vec<u8>,
}

/// Reads an archive strictly: magic, hex fields, NUL-terminated names and 4-byte alignment
/// of every header and every data block, ending exactly after the trailer's padding.
fn parse_newc(bytes: &[u8]) -> Vec<RawEntry> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        assert_eq!(at % 4, 0, "header at {at} is not 4-byte aligned");
        let header = &bytes[at..at + 110];
        assert_eq!(&header[..6], b"070701", "bad magic at {at}");
        let field = |i: usize| {
            let text = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(text, 16).unwrap()
        };
        let (filesize, namesize) = (field(6) as usize, field(11) as usize);
        let name_start = at + 110;
        let name = &bytes[name_start..name_start + namesize];
        assert_eq!(name.last(), Some(&0), "name at {at} is not NUL-terminated");
        let data_start = (name_start + namesize + 3) & !3;
        assert!(bytes[name_start + namesize..data_start].iter().all(|&b| b == 0));
        let data_end = data_start + filesize;
        let next = (data_end + 3) & !3;
        assert!(bytes[data_end..next].iter().all(|&b| b == 0), "non-zero padding after {at}");
        let entry = RawEntry {
            offset: at,
            ino: field(0),
            mode: field(1),
            uid: field(2),
            gid: field(3),
            nlink: field(4),
            mtime: field(5),
            rdev: (field(9), field(10)),
            name: String::from_utf8(name[..namesize - 1].to_vec()).unwrap(),
            data: bytes[data_start..data_end].to_vec(),
        };
        at = next;
        let trailer = entry.name == "TRAILER!!!";
        entries.push(entry);
        if trailer {
            assert_eq!(at, bytes.len(), "bytes after the trailer");
            return entries;
        }
    }
}

fn run_cpio_extract(archive: &[u8], into: &Path) {
    let mut child = Command::new("cpio")
        .args(["-idmv", "--no-absolute-filenames", "--quiet"])
        .current_dir(into)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cpio must be installed for these tests");
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "cpio failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn perms(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn sample() -> Initramfs {
    let mut initramfs = Initramfs::new();
    initramfs
        .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
        .unwrap()
        .dir("/proc", 0o555)
        .unwrap()
        .dir("/tmp", 0o1777)
        .unwrap()
        .file("etc/deep/nested/conf", 0o640, b"x=1\n".to_vec())
        .unwrap()
        .file("/empty", 0o600, Vec::new())
        .unwrap()
        .symlink("/bin/sh", "busybox")
        .unwrap()
        .symlink("/lib64", "/lib")
        .unwrap()
        .char_dev("/dev/console", 0o600, 5, 1)
        .unwrap()
        .char_dev("/dev/null", 0o666, 1, 3)
        .unwrap();
    initramfs
}

#[test]
fn archive_layout_is_deterministic_and_aligned() {
    let bytes = sample().to_cpio();
    let entries = parse_newc(&bytes);
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "bin",
            "bin/sh",
            "dev",
            "dev/console",
            "dev/null",
            "empty",
            "etc",
            "etc/deep",
            "etc/deep/nested",
            "etc/deep/nested/conf",
            "init",
            "lib64",
            "proc",
            "tmp",
            "TRAILER!!!"
        ]
    );
    for (index, entry) in entries[..entries.len() - 1].iter().enumerate() {
        assert_eq!(entry.ino as usize, index + 1, "{}", entry.name);
        assert_eq!((entry.uid, entry.gid, entry.mtime), (0, 0, 0), "{}", entry.name);
    }
    let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap();
    assert_eq!(find("bin").mode, 0o040755);
    assert_eq!(find("bin").nlink, 2);
    assert_eq!(find("tmp").mode, 0o041777);
    assert_eq!(find("proc").mode, 0o040555);
    assert_eq!(find("init").mode, 0o100755);
    assert_eq!(find("bin/sh").mode, 0o120777);
    assert_eq!(find("bin/sh").data, b"busybox");
    assert_eq!(find("dev/console").mode, 0o020600);
    assert_eq!(find("dev/console").rdev, (5, 1));
    assert_eq!(find("empty").data, b"");
    let trailer = entries.last().unwrap();
    assert_eq!((trailer.ino, trailer.mode, trailer.nlink), (0, 0, 1));
    // 110-byte header + "TRAILER!!!\0" = 121, padded to 124.
    assert_eq!(trailer.offset + 124, bytes.len());
}

#[test]
fn insertion_order_does_not_change_the_bytes() {
    let mut reversed = Initramfs::new();
    reversed
        .char_dev("/dev/null", 0o666, 1, 3)
        .unwrap()
        .char_dev("/dev/console", 0o600, 5, 1)
        .unwrap()
        .symlink("/lib64", "/lib")
        .unwrap()
        .symlink("/bin/sh", "busybox")
        .unwrap()
        .file("/empty", 0o600, Vec::new())
        .unwrap()
        .file("etc/deep/nested/conf", 0o640, b"x=1\n".to_vec())
        .unwrap()
        .dir("/tmp", 0o1777)
        .unwrap()
        .dir("/proc", 0o555)
        .unwrap()
        .file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
        .unwrap();
    assert_eq!(reversed.to_cpio(), sample().to_cpio());
}

#[test]
fn real_cpio_unpacks_contents_modes_and_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let mut initramfs = sample();
    initramfs.file("/bin/busybox", 0o4755, b"not really busybox".to_vec()).unwrap();
    run_cpio_extract(&initramfs.to_cpio(), dir.path());
    let root = dir.path();
    assert_eq!(std::fs::read(root.join("init")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(perms(&root.join("init")), 0o755);
    assert_eq!(std::fs::read(root.join("etc/deep/nested/conf")).unwrap(), b"x=1\n");
    assert_eq!(perms(&root.join("etc/deep/nested/conf")), 0o640);
    assert_eq!(perms(&root.join("etc/deep")), 0o755);
    assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
    assert_eq!(perms(&root.join("empty")), 0o600);
    assert_eq!(perms(&root.join("tmp")), 0o1777);
    assert_eq!(perms(&root.join("proc")), 0o555);
    assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
    assert_eq!(std::fs::read_link(root.join("lib64")).unwrap(), Path::new("/lib"));
    assert_eq!(std::fs::read(root.join("bin/sh")).unwrap(), b"not really busybox");
    assert_eq!(std::fs::metadata(root.join("init")).unwrap().mtime(), 0);
    if running_as_root() {
        assert_eq!(perms(&root.join("bin/busybox")), 0o4755);
        let console = std::fs::symlink_metadata(root.join("dev/console")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&console.file_type()));
        assert_eq!((libc::major(console.rdev()), libc::minor(console.rdev())), (5, 1));
        assert_eq!(console.permissions().mode() & 0o7777, 0o600);
    } else {
        println!("not root: device nodes and setuid bits not checked after unpacking");
    }
}

#[test]
fn gzip_archive_unpacks_with_gzip_and_cpio() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("initrd.gz");
    let mut gz = Vec::new();
    sample().write_gz(&mut gz).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    std::fs::write(&archive, &gz).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio -id --no-absolute-filenames --quiet")
        .arg("sh")
        .arg(&archive)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(root.join("init")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
    let mut again = Vec::new();
    sample().write_gz(&mut again).unwrap();
    assert_eq!(gz, again, "gzip output is reproducible");
}

#[test]
fn every_name_and_size_combination_survives_padding() {
    let mut initramfs = Initramfs::new();
    let mut expected = Vec::new();
    // Names of 1..=8 bytes against sizes 0..=9 cover every name and data padding remainder.
    for name_len in 1..=8usize {
        for size in 0..=9usize {
            let name = format!("d{name_len}/{}", "abcdefgh".repeat(2)[..name_len].to_string() + &size.to_string());
            let contents: Vec<u8> = (0..size).map(|i| (i * 37 + name_len) as u8).collect();
            let mode = 0o600 | ((size as u32 % 2) << 6);
            initramfs.file(&name, mode, contents.clone()).unwrap();
            expected.push((name, mode, contents));
        }
    }
    let bytes = initramfs.to_cpio();
    assert_eq!(bytes.len() % 4, 0);
    let entries = parse_newc(&bytes);
    assert_eq!(entries.len(), 8 + 80 + 1);
    let dir = tempfile::tempdir().unwrap();
    run_cpio_extract(&bytes, dir.path());
    for (name, mode, contents) in expected {
        let path = dir.path().join(&name);
        assert_eq!(std::fs::read(&path).unwrap(), contents, "{name}");
        assert_eq!(perms(&path), mode, "{name}");
    }
}

#[test]
fn duplicates_are_errors_unless_identical() {
    let mut initramfs = Initramfs::new();
    initramfs.file("/bin/x", 0o755, b"one".to_vec()).unwrap();
    // Identical re-adds are accepted: two binaries may bring the same libc.
    initramfs.file("bin/x", 0o755, b"one".to_vec()).unwrap();
    let error = initramfs.file("/bin/x", 0o755, b"two".to_vec()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "initramfs path bin/x added twice: first as a 3-byte file with mode 0755, \
         then as a 3-byte file with mode 0755"
    );
    let error = initramfs.symlink("/bin/x", "y").unwrap_err();
    assert_eq!(
        error.to_string(),
        "initramfs path bin/x added twice: first as a 3-byte file with mode 0755, \
         then as a symlink to y with mode 0777"
    );
    // "bin" was created implicitly: an explicit dir sets its mode, once.
    initramfs.dir("/bin", 0o700).unwrap();
    initramfs.dir("/bin", 0o700).unwrap();
    let error = initramfs.dir("/bin", 0o755).unwrap_err();
    assert!(matches!(error, InitramfsError::Conflict { .. }), "{error}");
    let entries = parse_newc(&initramfs.to_cpio());
    assert_eq!(entries[0].name, "bin");
    assert_eq!(entries[0].mode, 0o040700);
}

#[test]
fn invalid_paths_and_modes_are_refused_with_the_path() {
    let mut initramfs = Initramfs::new();
    initramfs.file("/etc/passwd", 0o644, b"root:x:0:0::/:/bin/sh\n".to_vec()).unwrap();
    let error = initramfs.file("/etc/passwd/x", 0o644, Vec::new()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "initramfs path /etc/passwd/x cannot be added: its parent etc/passwd is not a directory"
    );
    let error = initramfs.file("/a/../b", 0o644, Vec::new()).unwrap_err();
    assert_eq!(error.to_string(), "invalid initramfs path \"/a/../b\": '..' is not allowed");
    let error = initramfs.dir("/", 0o755).unwrap_err();
    assert_eq!(error.to_string(), "invalid initramfs path \"/\": it names the archive root");
    let error = initramfs.file("/x", 0o100644, Vec::new()).unwrap_err();
    assert_eq!(error.to_string(), "initramfs path /x: mode 0o100644 has bits outside 0o7777 (give permissions only)");
    let error = initramfs.host_file("/y", "/nonexistent/file", None).unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot read /nonexistent/file for initramfs path /y: No such file or directory (os error 2)"
    );
    let io_error: std::io::Error = error.into();
    assert_eq!(io_error.kind(), std::io::ErrorKind::NotFound);
    // Nothing half-added: the failed calls left the archive as it was.
    assert_eq!(initramfs.paths(), [PathBuf::from("etc"), PathBuf::from("etc/passwd")]);
}

#[test]
fn host_file_takes_host_mode_unless_given() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("tool");
    std::fs::write(&host, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o750)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&host, &link).unwrap();
    let mut initramfs = Initramfs::new();
    initramfs.host_file("/bin/tool", &host, None).unwrap();
    initramfs.host_file("/bin/via-link", &link, None).unwrap();
    initramfs.host_file("/bin/other", &host, Some(0o700)).unwrap();
    let entries = parse_newc(&initramfs.to_cpio());
    let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap();
    assert_eq!(find("bin/tool").mode, 0o100750);
    assert_eq!(find("bin/via-link").mode, 0o100750, "symlink followed to the real file");
    assert_eq!(find("bin/via-link").data, b"#!/bin/sh\n");
    assert_eq!(find("bin/other").mode, 0o100700);
}

// ---------------------------------------------------------------------------------------
// ELF closure

/// `ldd`'s view: every resolved library path plus the interpreter, without the vDSO.
fn ldd_closure(binary: &str) -> BTreeSet<PathBuf> {
    let output = Command::new("ldd").arg(binary).output().unwrap();
    assert!(output.status.success());
    let mut paths = BTreeSet::new();
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let line = line.trim();
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split(" (").next().unwrap(),
            None => line.split(" (").next().unwrap(),
        };
        if path.starts_with('/') {
            paths.insert(PathBuf::from(path));
        }
    }
    paths
}

fn skip_unless_exists(path: &str) -> bool {
    !crate::tools::test_requires(path, Path::new(path).exists())
}

#[test]
fn dropbear_closure_matches_ldd() {
    if skip_unless_exists(DROPBEAR) {
        return;
    }
    let closure = elf_closure(Path::new(DROPBEAR), &default_lib_dirs()).unwrap();
    assert_eq!(closure[0], Path::new("/lib64/ld-linux-x86-64.so.2"), "interpreter first");
    let ours: BTreeSet<PathBuf> = closure.iter().cloned().collect();
    assert_eq!(ours.len(), closure.len(), "no duplicates: {closure:?}");
    // The same files as ldd's, whichever of /lib or /usr/lib (one folder on a merged /usr)
    // the system's ld.so.conf names.
    let canonical = |paths: &BTreeSet<PathBuf>| -> BTreeSet<PathBuf> {
        paths.iter().map(|p| std::fs::canonicalize(p).unwrap()).collect()
    };
    assert_eq!(canonical(&ours), canonical(&ldd_closure(DROPBEAR)));
    assert!(ours.iter().any(|p| p.ends_with("x86_64-linux-gnu/libc.so.6")), "{closure:?}");
    // libgmp comes in only through libtomcrypt/libtommath: the walk is recursive.
    assert!(ours.iter().any(|p| p.ends_with("libgmp.so.10")), "{closure:?}");
    assert_eq!(closure, elf_closure(Path::new(DROPBEAR), &default_lib_dirs()).unwrap());
}

#[test]
fn static_busybox_has_an_empty_closure() {
    if skip_unless_exists(BUSYBOX) {
        return;
    }
    assert_eq!(elf_closure(Path::new(BUSYBOX), &default_lib_dirs()).unwrap(), Vec::<PathBuf>::new());
}

#[test]
fn missing_library_names_itself_and_its_user() {
    if skip_unless_exists(DROPBEAR) {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let error = elf_closure(Path::new(DROPBEAR), &[empty.path().to_path_buf()]).unwrap_err();
    let text = error.to_string();
    assert!(text.starts_with("shared library libtomcrypt.so.1 needed by /usr/sbin/dropbear not found in ["), "{text}");
    assert!(text.contains(&empty.path().display().to_string()), "{text}");
}

#[test]
fn non_elf_and_broken_elf_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script");
    std::fs::write(&script, b"#!/bin/sh\n").unwrap();
    let error = elf_closure(&script, &[]).unwrap_err();
    assert_eq!(error.to_string(), format!("{} is not an ELF file (no \\x7fELF magic)", script.display()));

    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, b"\x7fELF\x02\x01\x01").unwrap();
    let error = elf_closure(&truncated, &[]).unwrap_err();
    assert!(matches!(error, ElfError::Malformed { .. }), "{error}");

    let mut elf32 = vec![0u8; 64];
    elf32[..6].copy_from_slice(b"\x7fELF\x01\x01");
    let path32 = dir.path().join("elf32");
    std::fs::write(&path32, &elf32).unwrap();
    let error = elf_closure(&path32, &[]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("{}: unsupported ELF file: 32-bit ELF (only ELF64 is read)", path32.display())
    );

    // A real binary cut short after its headers: program headers point past the end.
    if Path::new(DROPBEAR).exists() {
        let whole = std::fs::read(DROPBEAR).unwrap();
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &whole[..200]).unwrap();
        let error = elf_closure(&cut, &[]).unwrap_err();
        assert!(matches!(error, ElfError::Malformed { .. }), "{error}");
    }

    let error = elf_closure(Path::new("/nonexistent/bin"), &[]).unwrap_err();
    assert_eq!(error.to_string(), "cannot read ELF file /nonexistent/bin: No such file or directory (os error 2)");
}

/// Builds a program whose library sits next to it in `$ORIGIN/../lib`, found only through
/// DT_RUNPATH, as in Nix-built binaries. Needs a C compiler; skipped without one.
#[test]
fn runpath_with_origin_is_followed() {
    let cc = Command::new("cc").arg("--version").output().is_ok_and(|o| o.status.success());
    if !crate::tools::test_requires("a C compiler (cc)", cc) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bin, lib) = (dir.path().join("bin"), dir.path().join("lib"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(dir.path().join("greet.c"), "int greet(void) { return 7; }\n").unwrap();
    std::fs::write(dir.path().join("main.c"), "int greet(void);\nint main(void) { return greet(); }\n").unwrap();
    let cc = |args: &[&str]| {
        let output = Command::new("cc").args(args).current_dir(dir.path()).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    cc(&["-shared", "-fPIC", "-Wl,-soname,libgreet.so.1", "-o", "lib/libgreet.so.1", "greet.c"]);
    cc(&["-o", "bin/main", "main.c", "lib/libgreet.so.1", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"]);
    let status = Command::new(bin.join("main")).status().unwrap();
    assert_eq!(status.code(), Some(7), "the test program itself runs");
    let closure = elf_closure(&bin.join("main"), &default_lib_dirs()).unwrap();
    let real_lib = std::fs::canonicalize(lib.join("libgreet.so.1")).unwrap();
    let found: Vec<PathBuf> = closure.iter().map(|p| std::fs::canonicalize(p).unwrap()).collect();
    assert!(found.contains(&real_lib), "{closure:?}");
    assert!(closure.iter().any(|p| p.ends_with("libc.so.6")), "{closure:?}");
}

#[test]
fn elf_with_libs_puts_everything_at_its_host_path() {
    if skip_unless_exists(DROPBEAR) {
        return;
    }
    let mut initramfs = Initramfs::new();
    initramfs.elf_with_libs(DROPBEAR, DROPBEAR).unwrap();
    // A second binary sharing libc and the loader adds no conflict.
    initramfs.elf_with_libs("/usr/bin/dropbearkey", "/usr/bin/dropbearkey").unwrap();
    let entries = parse_newc(&initramfs.to_cpio());
    let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{name} missing"));
    let loader = find("lib64/ld-linux-x86-64.so.2");
    assert_eq!(loader.mode & 0o170000, 0o100000, "loader is a regular file, not a symlink");
    assert_eq!(loader.data, std::fs::read("/lib64/ld-linux-x86-64.so.2").unwrap());
    assert_eq!(find("usr/sbin/dropbear").data, std::fs::read(DROPBEAR).unwrap());
    assert_eq!(find("usr/sbin/dropbear").mode, 0o100755);
    for library in elf_closure(Path::new(DROPBEAR), &default_lib_dirs()).unwrap() {
        let name = library.to_str().unwrap().trim_start_matches('/');
        assert_eq!(find(name).data, std::fs::read(&library).unwrap(), "{name}");
    }
    let error = Initramfs::new().elf_with_libs("/bin/x", "/nonexistent").unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot collect the libraries of initramfs binary /bin/x: \
         cannot read ELF file /nonexistent: No such file or directory (os error 2)"
    );
}

// ---------------------------------------------------------------------------------------
// Kernel modules

fn modules_dir() -> Option<PathBuf> {
    let dir = Path::new(KERNEL_DIR).join("modules");
    crate::tools::test_requires(&format!("{} (scripts/setup)", dir.display()), dir.is_dir()).then_some(dir)
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.file_stem().unwrap().to_str().unwrap().to_string()).collect()
}

#[test]
fn module_closure_orders_dependencies_first() {
    let Some(dir) = modules_dir() else { return };
    let wanted = ["virtio_net", "9pnet_virtio", "9p", "cifs", "virtio_pci"];
    let closure = module_closure(&dir, &wanted).unwrap();
    let order = names(&closure);
    let position =
        |name: &str| order.iter().position(|n| n == name).unwrap_or_else(|| panic!("{name} missing: {order:?}"));
    for (before, after) in [
        ("virtio", "virtio_net"),
        ("virtio_ring", "virtio_net"),
        ("net_failover", "virtio_net"),
        ("failover", "net_failover"),
        ("9pnet", "9pnet_virtio"),
        ("netfs", "9p"),
        ("fscache", "9p"),
        ("netfs", "fscache"),
        ("9pnet", "9p"),
        ("cifs_md4", "cifs"),
        ("cifs_arc4", "cifs"),
        ("dns_resolver", "cifs"),
        ("fscache", "cifs"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("virtio_pci_legacy_dev", "virtio_pci"),
    ] {
        assert!(position(before) < position(after), "{before} must precede {after}: {order:?}");
    }
    // Each file once, and every listed module's own dependencies precede it.
    assert_eq!(order.iter().collect::<BTreeSet<_>>().len(), order.len(), "{order:?}");
    for (index, path) in closure.iter().enumerate() {
        for dependency in module_depends(path).unwrap() {
            let at = order.iter().position(|n| normalize_module_name(n) == dependency).unwrap();
            assert!(at < index, "{dependency} after {}", order[index]);
        }
    }
    assert_eq!(closure, module_closure(&dir, &wanted).unwrap(), "deterministic");
}

#[test]
fn module_names_treat_dash_and_underscore_alike() {
    let Some(dir) = modules_dir() else { return };
    let underscore = module_closure(&dir, &["ghash_generic"]).unwrap();
    let dash = module_closure(&dir, &["ghash-generic"]).unwrap();
    assert_eq!(underscore, dash);
    assert_eq!(names(&underscore), ["gf128mul", "ghash-generic"]);
}

#[test]
fn missing_modules_name_who_needs_them() {
    let Some(dir) = modules_dir() else { return };
    let error = module_closure(&dir, &["no_such_module"]).unwrap_err();
    assert_eq!(error.to_string(), format!("kernel module no_such_module (requested) not found in {}", dir.display()));
    let partial = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("9p.ko"), partial.path().join("9p.ko")).unwrap();
    std::fs::write(partial.path().join("9pnet.ko.xz"), b"").unwrap();
    let error = module_closure(partial.path(), &["9p"]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "kernel module 9pnet (needed by 9p) not found in {0}; only {0}/9pnet.ko.xz exists, \
             decompress it first",
            partial.path().display()
        )
    );
}

/// nixpkgs' kernel may build in a module the guests ask for: modules.builtin names it, and the
/// closure skips it instead of failing; a module neither there nor built in still fails.
#[test]
fn built_in_modules_need_no_file() {
    let Some(dir) = modules_dir() else { return };
    let partial = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("9p.ko"), partial.path().join("9p.ko")).unwrap();
    let error = module_closure(partial.path(), &["9p"]).unwrap_err();
    assert!(error.to_string().starts_with("kernel module 9pnet (needed by 9p) not found"), "{error}");
    std::fs::write(
        partial.path().join("modules.builtin"),
        "kernel/net/9p/9pnet.ko\nkernel/fs/netfs/netfs.ko\nkernel/fs/fscache/fscache.ko\n",
    )
    .unwrap();
    let closure = module_closure(partial.path(), &["9p", "ext4"]);
    let error = closure.unwrap_err();
    assert_eq!(error.to_string(), format!("kernel module ext4 (requested) not found in {}", partial.path().display()));
    assert_eq!(names(&module_closure(partial.path(), &["9p", "netfs"]).unwrap()), ["9p"]);
}

#[test]
fn ambiguous_and_broken_modules_are_reported() {
    let Some(dir) = modules_dir() else { return };
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("netfs.ko"), scratch.path().join("my-mod.ko")).unwrap();
    std::fs::copy(dir.join("netfs.ko"), scratch.path().join("my_mod.ko")).unwrap();
    let error = module_closure(scratch.path(), &["netfs"]).unwrap_err();
    assert!(matches!(error, ModuleError::Ambiguous { ref module, .. } if module == "my_mod"), "{error}");

    let broken = tempfile::tempdir().unwrap();
    if Path::new(BUSYBOX).exists() {
        std::fs::copy(BUSYBOX, broken.path().join("fake.ko")).unwrap();
        let error = module_closure(broken.path(), &["fake"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("kernel module {}/fake.ko: has no .modinfo section", broken.path().display())
        );
    }
    std::fs::write(broken.path().join("text.ko"), b"hello").unwrap();
    let error = module_closure(broken.path(), &["text"]).unwrap_err();
    assert!(error.to_string().contains("is not an ELF file"), "{error}");
}

// ---------------------------------------------------------------------------------------
// The real kernel unpacks our archive, loads the modules in our order, runs dropbear.

fn wait_with_deadline(child: &mut std::process::Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn real_kernel_boots_our_initramfs() {
    let kernel = Path::new(KERNEL_DIR).join("vmlinuz");
    let qemu = "qemu-system-x86_64";
    if !crate::tools::test_requires(&format!("{} (scripts/setup)", kernel.display()), kernel.exists())
        || !crate::tools::test_requires(qemu, Command::new(qemu).arg("--version").output().is_ok())
    {
        return;
    }
    if skip_unless_exists(BUSYBOX) || skip_unless_exists(DROPBEAR) {
        return;
    }
    let Some(dir) = modules_dir() else { return };
    let modules = module_closure(&dir, &["virtio_net", "9pnet_virtio", "9p", "cifs", "virtio_pci"]).unwrap();
    let mut initramfs = Initramfs::new();
    initramfs
        .host_file("/bin/busybox", BUSYBOX, None)
        .unwrap()
        .symlink("/bin/sh", "busybox")
        .unwrap()
        .char_dev("/dev/console", 0o600, 5, 1)
        .unwrap()
        .dir("/proc", 0o555)
        .unwrap()
        .elf_with_libs(DROPBEAR, DROPBEAR)
        .unwrap();
    let mut script = String::from("#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n");
    for module in &modules {
        let name = module.file_name().unwrap().to_str().unwrap();
        initramfs.host_file(format!("/modules/{name}"), module, None).unwrap();
        script.push_str(&format!("/bin/busybox insmod /modules/{name} || echo INSMOD-FAILED {name}\n"));
    }
    script.push_str(
        "echo LOADED $(/bin/busybox wc -l < /proc/modules)\n\
         /usr/sbin/dropbear -V 2>&1 | /bin/busybox sed 's/^/DROPBEAR: /'\n\
         echo INIT-DONE\n\
         /bin/busybox poweroff -f\n",
    );
    initramfs.file("/init", 0o755, script).unwrap();

    let work = tempfile::tempdir().unwrap();
    let initrd = work.path().join("initrd.gz");
    initramfs.write_gz(std::fs::File::create(&initrd).unwrap()).unwrap();
    let log = work.path().join("serial.log");
    let mut child = Command::new(qemu)
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(180));
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("serial log:\n{serial}");
    assert!(status.is_some(), "guest did not power off within 180 s; serial log:\n{serial}");
    assert!(serial.contains("INIT-DONE"), "serial log:\n{serial}");
    assert!(!serial.contains("INSMOD-FAILED"), "serial log:\n{serial}");
    assert!(serial.contains(&format!("LOADED {}", modules.len())), "serial log:\n{serial}");
    assert!(serial.contains("DROPBEAR: Dropbear v"), "serial log:\n{serial}");
}
