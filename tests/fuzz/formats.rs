//! Targets 5 to 15: the codecs of src/format/, on the harness of tests/fuzz.rs. Readers (ISO
//! and UDF, WIM, ELF, tar, PNG and PPM) get valid inputs made by a generator that knows the
//! format, then damage aimed at their fields, and must refuse what they cannot read with an
//! error of their own type; a valid input must read back as it was made (the FAT boot sector
//! reader is compared with the rule written out here). Writers (MBR, cpio, pcap, PNG, MD4, memory pages) get
//! random content, and what they write is read back by an independent reader here (or, for
//! MD4, an independent implementation).

use super::*;

use nix_winvm::format::elf::{Elf, ParseError};
use nix_winvm::format::fat;
use nix_winvm::format::iso::{Iso, IsoError, IsoProblem};
use nix_winvm::format::pcap::{self, PcapWriter};
use nix_winvm::format::tar::{self, CopyError, TarError};
use nix_winvm::format::wim::{self, WimError, WimImage};
use nix_winvm::format::{cpio, mbr, md4, png, ppm};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put_u16(bytes: &mut [u8], at: usize, value: u16) {
    if bytes.len() >= at + 2 {
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
}

/// Whether `program` is on PATH; a missing one is said once, and fails the run under
/// NIX_WINVM_REQUIRE_TOOLS=1 (`tools::test_requires`).
fn have(program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success());
    nix_winvm::testing::test_requires(program, found)
}

// ---------------------------------------------------------------------------------------------
// Target 5: ISO 9660 and UDF images

struct IsoSeed {
    what: &'static str,
    bytes: Vec<u8>,
    wim: Vec<u8>,
    readme: Vec<u8>,
    /// Sectors that are not all zeros: descriptors, directories, file entries, data.
    sectors: Vec<usize>,
}

const ISO_SECTOR: usize = 2048;

fn make_iso_seeds(dir: &Path) -> Vec<IsoSeed> {
    let tree = dir.join("iso-tree");
    std::fs::create_dir_all(tree.join("sources")).unwrap();
    let wim: Vec<u8> = (0..7000u32).map(|i| (i * 7 + i / 2048) as u8).collect();
    let readme = b"readme\n".to_vec();
    std::fs::write(tree.join("sources/install.wim"), &wim).unwrap();
    std::fs::write(tree.join("README.TXT"), &readme).unwrap();
    let makers: [(&'static str, &str, &[&str]); 3] = [
        ("UDF (genisoimage)", "genisoimage", &["-quiet", "-udf", "-o"]),
        ("Joliet (xorriso)", "xorriso", &["-as", "mkisofs", "-quiet", "-J", "-o"]),
        ("plain ISO 9660 (xorriso)", "xorriso", &["-as", "mkisofs", "-quiet", "-o"]),
    ];
    let mut seeds = Vec::new();
    for (i, (what, program, args)) in makers.into_iter().enumerate() {
        if !have(program) {
            continue;
        }
        let out = dir.join(format!("seed-{i}.iso"));
        let made = std::process::Command::new(program).args(args).arg(&out).arg(&tree).output().unwrap();
        assert!(made.status.success(), "{program}: {}", String::from_utf8_lossy(&made.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let sectors = (0..bytes.len() / ISO_SECTOR)
            .filter(|s| bytes[s * ISO_SECTOR..][..ISO_SECTOR].iter().any(|&b| b != 0))
            .collect();
        seeds.push(IsoSeed { what, bytes, wim: wim.clone(), readme: readme.clone(), sectors });
    }
    seeds
}

struct IsoInput {
    seed: usize,
    bytes: Vec<u8>,
    damaged: bool,
}

/// An ECMA-167 tag's checksum, made right again after the damage, so that the damage reaches
/// the fields behind the tag.
fn reseal_udf_tag(sector: &mut [u8]) {
    let sum = sector[..16].iter().enumerate().filter(|(i, _)| *i != 4).fold(0u8, |s, (_, b)| s.wrapping_add(*b));
    sector[4] = sum;
}

fn damage_iso(rng: &mut Rng, seed: &IsoSeed, bytes: &mut Vec<u8>) {
    let sectors = bytes.len() / ISO_SECTOR;
    match rng.below(8) {
        0..=3 if !seed.sectors.is_empty() => {
            let s = *rng.pick(&seed.sectors);
            if s >= sectors {
                return;
            }
            let sector = &mut bytes[s * ISO_SECTOR..(s + 1) * ISO_SECTOR];
            let tagged = {
                let sum =
                    sector[..16].iter().enumerate().filter(|(i, _)| *i != 4).fold(0u8, |a, (_, b)| a.wrapping_add(*b));
                sum == sector[4] && sector[..2] != [0, 0]
            };
            for _ in 0..1 + rng.size(3) {
                let at = rng.below(ISO_SECTOR / 4) * 4;
                match rng.below(4) {
                    0 => {
                        let i = rng.below(ISO_SECTOR);
                        sector[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let v = rng.extreme(
                            &[0, 1, 2, 0xFFFF, 0x3FFF_FFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 256, sectors as u32, 2048],
                            |r| r as u32,
                        );
                        put_u32(sector, at, v);
                    }
                    2 => {
                        let v = rng.extreme(&[0, 1, 2, 3, 4, 8, 16, 254, 255, 0xFFFF], |r| r as u16);
                        put_u16(sector, at + 2 * rng.below(2), v);
                    }
                    _ => {
                        let i = rng.below(ISO_SECTOR);
                        sector[i] = *rng.pick(&[0, 1, 2, 3, 0x80, 0xFF, 8, 16, 34, 38]);
                    }
                }
            }
            if tagged && rng.percent(70) {
                reseal_udf_tag(sector);
            }
        }
        4 => {
            let cut = if rng.percent(50) { rng.below(sectors + 1) * ISO_SECTOR } else { rng.below(bytes.len() + 1) };
            bytes.truncate(cut);
        }
        5 if seed.sectors.len() >= 2 => {
            // One structure where another belongs.
            let (from, to) = (*rng.pick(&seed.sectors), *rng.pick(&seed.sectors));
            if from < sectors && to < sectors {
                let copy = bytes[from * ISO_SECTOR..(from + 1) * ISO_SECTOR].to_vec();
                bytes[to * ISO_SECTOR..(to + 1) * ISO_SECTOR].copy_from_slice(&copy);
            }
        }
        _ => damage_bytes(rng, bytes, &[b"CD001", b"\x02\x00", b"\xff\xff\xff\xff", &[0u8; 16]]),
    }
}

fn generate_iso(rng: &mut Rng, seeds: &[IsoSeed]) -> IsoInput {
    let seed = rng.below(seeds.len());
    let mut bytes = seeds[seed].bytes.clone();
    let damaged = rng.percent(95);
    if damaged {
        for _ in 0..1 + rng.size(2) {
            damage_iso(rng, &seeds[seed], &mut bytes);
        }
    }
    IsoInput { seed, bytes, damaged }
}

fn iso_kind(error: &IsoError) -> String {
    match &error.problem {
        IsoProblem::Open(_) => "Open",
        IsoProblem::Read { .. } => "Read",
        IsoProblem::Truncated { .. } => "Truncated",
        IsoProblem::NotAnIso => "NotAnIso",
        IsoProblem::Udf(_) => "Udf",
        IsoProblem::Iso9660(_) => "Iso9660",
        IsoProblem::Directory { .. } => "Directory",
        IsoProblem::NoFile { .. } => "NoFile",
        IsoProblem::BeyondFile { .. } => "BeyondFile",
    }
    .to_string()
}

fn check_iso(input: &IsoInput, path: &Path, seeds: &[IsoSeed]) -> Result<Verdict, String> {
    std::fs::write(path, &input.bytes).map_err(|e| format!("cannot write the input: {e}"))?;
    let refused = |error: IsoError| -> Result<Verdict, String> {
        if !error.to_string().contains(&path.display().to_string()) {
            return Err(format!("the error does not name the image: {error}"));
        }
        if matches!(error.problem, IsoProblem::Open(_) | IsoProblem::Read { .. }) {
            return Err(format!("an I/O error on a readable file: {error}"));
        }
        if !input.damaged {
            return Err(format!("the seed was refused: {error}"));
        }
        Ok(Verdict::Refused(iso_kind(&error)))
    };
    let iso = match Iso::open(path) {
        Ok(iso) => iso,
        Err(error) => return refused(error),
    };
    let seed = &seeds[input.seed];
    for (wanted, content) in [("sources/install.wim", &seed.wim), ("readme.txt", &seed.readme)] {
        let file = match iso.find(wanted) {
            Ok(Some(file)) => file,
            Ok(None) if input.damaged => continue,
            Ok(None) => return Err(format!("{wanted} is missing from the seed")),
            Err(error) => return refused(error),
        };
        // Never more than a megabyte at once, whatever size a damaged entry claims.
        let len = file.size.min(1 << 20) as usize;
        match iso.read(&file, 0, len) {
            Ok(bytes) if !input.damaged && bytes != **content => {
                return Err(format!("{wanted} of the seed read back as other bytes"))
            }
            Ok(_) => {}
            Err(error) => return refused(error),
        }
    }
    for other in ["sources", "a/b/c/d", "/"] {
        if let Err(error) = iso.find(other) {
            return refused(error);
        }
    }
    Ok(Verdict::Accepted)
}

#[test]
fn fuzz_iso_reader() {
    let dir = scratch_dir();
    let seeds = make_iso_seeds(dir.path());
    if seeds.is_empty() {
        eprintln!("fuzz iso: no genisoimage or xorriso to make seed images: skipped");
        return;
    }
    println!("fuzz iso: seeds: {}", seeds.iter().map(|s| s.what).collect::<Vec<_>>().join(", "));
    let path = dir.path().join("input.iso");
    run(
        "iso",
        64 << 20,
        |rng| generate_iso(rng, &seeds),
        |input| check_iso(input, &path, &seeds),
        |input| {
            let seed = &seeds[input.seed].bytes;
            let changed: Vec<usize> = (0..input.bytes.len().max(seed.len()))
                .filter(|&i| input.bytes.get(i) != seed.get(i))
                .take(64)
                .collect();
            format!(
                "{} of {} bytes, damaged {}; differs at {changed:?}",
                seeds[input.seed].what,
                input.bytes.len(),
                input.damaged
            )
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Target 6: WIM headers and their XML

const XML_TOKENS: &[&[u8]] = &[
    b"<",
    b">",
    b"</",
    b"/>",
    b"&",
    b"&amp;",
    b"&#x",
    b"&#",
    b";",
    b"<!--",
    b"-->",
    b"<?",
    b"?>",
    b"<!",
    b"\"",
    b"'",
    b"=",
    b"IMAGE",
    b"WIM",
    b"INDEX",
    b"<IMAGE INDEX=\"1\">",
    b"</IMAGE>",
    b"\xff",
    b"\0",
];

const XML_ESCAPES: &[(char, &str)] = &[('<', "&lt;"), ('&', "&amp;"), ('>', "&gt;"), ('"', "&quot;"), ('\'', "&apos;")];

/// `text` as XML character data, each special character escaped one of the ways XML allows.
fn xml_text(rng: &mut Rng, text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match XML_ESCAPES.iter().find(|(special, _)| *special == c) {
            Some((_, entity)) if c == '<' || c == '&' || rng.percent(50) => match rng.below(3) {
                0 => out.push_str(&format!("&#{};", c as u32)),
                1 => out.push_str(&format!("&#x{:X};", c as u32)),
                _ => out.push_str(entity),
            },
            _ if rng.percent(5) => out.push_str(&format!("&#x{:x};", c as u32)),
            _ => out.push(c),
        }
    }
    out
}

/// Text the parser keeps as it is: no NUL (which XML does not allow, and which ends the
/// document's trailing padding) and no surrounding blanks (values are trimmed).
fn xml_value(rng: &mut Rng, max: usize) -> String {
    random_text(rng, max).replace('\u{0}', "").trim().to_string()
}

struct WimInput {
    bytes: Vec<u8>,
    expected: Option<Vec<WimImage>>,
}

fn wim_model(rng: &mut Rng) -> (String, Vec<WimImage>) {
    let mut indexes: Vec<u32> = Vec::new();
    for _ in 0..1 + rng.size(6) {
        let index = rng.extreme(&[1, 2, 3, 4, 5, u32::MAX], |r| r as u32 % 1000);
        if !indexes.contains(&index) {
            indexes.push(index);
        }
    }
    let mut images = Vec::new();
    let mut xml = String::from("<WIM>");
    if rng.percent(50) {
        xml.push_str(&format!("<TOTALBYTES>{}</TOTALBYTES>", rng.next()));
    }
    for index in indexes {
        let image = WimImage {
            index,
            name: xml_value(rng, 20),
            display_name: rng.percent(60).then(|| xml_value(rng, 20)),
            edition_id: rng.percent(70).then(|| xml_value(rng, 10)),
            installation_type: rng.percent(50).then(|| xml_value(rng, 8)),
            build: rng.percent(60).then(|| rng.extreme(&[0, 14393, 26100, u32::MAX], |r| r as u32)),
        };
        let quote = if rng.percent(50) { '"' } else { '\'' };
        let pad = if rng.percent(30) { " " } else { "" };
        xml.push_str(&format!("<IMAGE{pad} INDEX={quote}{pad}{index}{pad}{quote}{pad}>"));
        xml.push_str(&format!("<NAME>{}</NAME>", xml_text(rng, &image.name)));
        if rng.percent(30) {
            xml.push_str("<!-- a comment <IMAGE> -->");
        }
        let mut windows = String::new();
        if let Some(id) = &image.edition_id {
            windows.push_str(&format!("<EDITIONID>{}</EDITIONID>", xml_text(rng, id)));
        }
        if let Some(kind) = &image.installation_type {
            windows.push_str(&format!("<INSTALLATIONTYPE>{}</INSTALLATIONTYPE>", xml_text(rng, kind)));
        }
        if let Some(build) = image.build {
            windows.push_str(&format!("<VERSION><MAJOR>10</MAJOR><BUILD> {build}\n</BUILD></VERSION>"));
        }
        if !windows.is_empty() || rng.percent(30) {
            xml.push_str(&format!("<WINDOWS><ARCH>9</ARCH>{windows}</WINDOWS>"));
        }
        if let Some(display) = &image.display_name {
            xml.push_str(&format!("<DISPLAYNAME>{}</DISPLAYNAME>", xml_text(rng, display)));
        }
        xml.push_str("</IMAGE>");
        images.push(image);
    }
    xml.push_str("</WIM>");
    if rng.percent(20) {
        xml = format!("<?xml version=\"1.0\" encoding=\"UTF-16\"?>\n{xml}\n\u{0}");
    }
    images.sort_by_key(|i| i.index);
    (xml, images)
}

fn utf16le_with_bom(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    out
}

/// A WIM's header and XML, as wimlib lays them out: the XML after some resources.
fn wim_bytes(rng: &mut Rng, xml: &[u8]) -> Vec<u8> {
    let gap = rng.size(300);
    let mut out = vec![0u8; wim::HEADER_LEN];
    out[..8].copy_from_slice(wim::MAGIC);
    put_u32(&mut out, 8, wim::HEADER_LEN as u32);
    put_u32(&mut out, 44, 1);
    out[72..79].copy_from_slice(&(xml.len() as u64).to_le_bytes()[..7]);
    out[79] = 0x02;
    put_u64(&mut out, 80, (wim::HEADER_LEN + gap) as u64);
    put_u64(&mut out, 88, xml.len() as u64);
    out.extend(rng.bytes(gap));
    out.extend_from_slice(xml);
    let tail = rng.size(100);
    out.extend(rng.bytes(tail));
    out
}

fn generate_wim(rng: &mut Rng) -> WimInput {
    let (mut xml, images) = wim_model(rng);
    let mut expected = Some(images);
    if rng.percent(15) {
        let depth = 1 + rng.size(200);
        xml = format!("<WIM>{}<IMAGE INDEX=\"1\"/>{}</WIM>", "<A>".repeat(depth), "</A>".repeat(depth));
        expected = None;
    }
    let xml_damaged = rng.percent(35);
    let mut utf16 = if xml_damaged {
        let mut text = xml.into_bytes();
        for _ in 0..1 + rng.size(3) {
            damage_bytes(rng, &mut text, XML_TOKENS);
        }
        expected = None;
        utf16le_with_bom(&String::from_utf8_lossy(&text))
    } else {
        utf16le_with_bom(&xml)
    };
    if rng.percent(5) {
        // Raw damage to the UTF-16 itself: odd lengths, lone surrogates, no byte order mark.
        damage_bytes(rng, &mut utf16, &[b"\x00\xd8", b"\xff\xfe", b"\xfe\xff", b"\x00"]);
        expected = None;
    }
    let mut bytes = wim_bytes(rng, &utf16);
    if rng.percent(30) {
        expected = None;
        let len = bytes.len() as u64;
        match rng.below(7) {
            0 => bytes[rng.below(8)] ^= 1 << rng.below(8),
            1 => put_u32(&mut bytes, 8, rng.extreme(&[0, 207, 209, u32::MAX], |r| r as u32)),
            2 => bytes[79] |= 0x04,
            3 => put_u64(
                &mut bytes,
                80,
                rng.extreme(&[0, len, len.saturating_sub(1), u64::MAX, u64::MAX - 10, 1 << 63], |r| r),
            ),
            4 => {
                let v = rng.extreme(&[0, 1, len, 64 << 20, (64 << 20) + 1, (1 << 56) - 1], |r| r & ((1 << 56) - 1));
                bytes[72..79].copy_from_slice(&v.to_le_bytes()[..7]);
            }
            5 => bytes[..8].copy_from_slice(b"WLPWM\0\0\0"),
            _ => {
                let keep = rng.below(bytes.len() + 1);
                bytes.truncate(keep);
            }
        }
    }
    WimInput { bytes, expected }
}

#[derive(Debug)]
enum WimRead {
    Wim(WimError),
    Outside { offset: u64, len: usize },
}

fn wim_kind(error: &WimError) -> &'static str {
    match error {
        WimError::TooShort { .. } => "TooShort",
        WimError::BadMagic => "BadMagic",
        WimError::Pipable => "Pipable",
        WimError::BadHeaderSize(_) => "BadHeaderSize",
        WimError::XmlCompressed => "XmlCompressed",
        WimError::XmlOutsideFile { .. } => "XmlOutsideFile",
        WimError::XmlTooLarge { .. } => "XmlTooLarge",
        WimError::NoByteOrderMark => "NoByteOrderMark",
        WimError::NotUtf16 => "NotUtf16",
        WimError::Xml(_) => "Xml",
        WimError::RootNotWim(_) => "RootNotWim",
        WimError::NoIndex => "NoIndex",
        WimError::NoImages => "NoImages",
    }
}

fn check_wim(input: &WimInput) -> Result<Verdict, String> {
    let bytes = &input.bytes;
    let read = |offset: u64, len: usize| {
        let start = usize::try_from(offset).map_err(|_| WimRead::Outside { offset, len })?;
        bytes.get(start..start.saturating_add(len)).map(<[u8]>::to_vec).ok_or(WimRead::Outside { offset, len })
    };
    let result = wim::read_images(bytes.len() as u64, read, WimRead::Wim);
    match (result, &input.expected) {
        (Ok(images), Some(expected)) if &images != expected => Err(format!("read {images:?}, made {expected:?}")),
        (Ok(_), _) => Ok(Verdict::Accepted),
        (Err(WimRead::Outside { offset, len }), _) => {
            Err(format!("asked for bytes {offset}..+{len} outside the {}-byte file", bytes.len()))
        }
        (Err(WimRead::Wim(error)), Some(_)) => Err(format!("a valid WIM was refused: {error}")),
        (Err(WimRead::Wim(error)), None) => {
            if error.to_string().is_empty() {
                return Err("an empty error message".into());
            }
            Ok(Verdict::Refused(wim_kind(&error).into()))
        }
    }
}

#[test]
fn fuzz_wim_reader() {
    run("wim", 16 << 20, generate_wim, check_wim, |input| {
        format!("expected {:?}, {} bytes: {}", input.expected, input.bytes.len(), escaped(&input.bytes))
    });
}

// ---------------------------------------------------------------------------------------------
// Target 7: FAT boot sectors

/// A sector as a volume's boot sector might be: FAT12, FAT16 or FAT32 names at either
/// layout's field, or bytes of anything, cut anywhere.
fn generate_boot_sector(rng: &mut Rng) -> Vec<u8> {
    let mut sector = if rng.percent(30) { rng.bytes(512) } else { vec![0; 512] };
    for _ in 0..rng.size(3) {
        let at = *rng.pick(&[54, 82, 53, 83, 0, 505]);
        let names: [&[u8]; 6] = [b"FAT12   ", b"FAT16   ", b"FAT32   ", b"FAT1", b"fat32", b"FAT"];
        let name = *rng.pick(&names);
        let end = (at + name.len()).min(sector.len());
        sector[at..end].copy_from_slice(&name[..end - at]);
    }
    let keep = if rng.percent(20) { rng.below(513) } else { 512 };
    sector.truncate(keep);
    sector
}

fn check_boot_sector(sector: &[u8]) -> Result<Verdict, String> {
    let named = |at: usize, name: &[u8]| sector.len() >= at + 5 && &sector[at..at + 5] == name;
    let expected = if named(82, b"FAT32") {
        Some(fat::FatKind::Fat32)
    } else if named(54, b"FAT16") {
        Some(fat::FatKind::Fat16)
    } else {
        None
    };
    match fat::kind(sector) {
        found if found == expected => Ok(Verdict::Accepted),
        found => Err(format!("read as {found:?}, holds {expected:?}")),
    }
}

#[test]
fn fuzz_fat_boot_sector() {
    run("fat", 1 << 20, generate_boot_sector, |sector| check_boot_sector(sector), |sector| escaped(sector));
}

// ---------------------------------------------------------------------------------------------
// Target 8: the MBR writer

fn check_mbr(input: &(u32, u8, u32, u32)) -> Result<Verdict, String> {
    let &(signature, kind, first, sectors) = input;
    let sector = mbr::one_partition(signature, kind, first, sectors);
    let entries: Vec<&[u8]> = sector[446..510].chunks(16).collect();
    let read = (
        le32(&sector, 440),
        entries[0][0],
        entries[0][4],
        le32(entries[0], 8),
        le32(entries[0], 12),
        [sector[510], sector[511]],
    );
    if read != (signature, 0, kind, first, sectors, [0x55, 0xAA]) {
        return Err(format!("read back as {read:?}"));
    }
    if entries[1..].iter().any(|e| e.iter().any(|&b| b != 0)) || sector[444..446] != [0, 0] {
        return Err("more than one partition entry".into());
    }
    // The code asks the BIOS for the next boot device and stops; the rest of it is zeros.
    if sector[..5] != [0xCD, 0x18, 0xF4, 0xEB, 0xFD] || sector[5..440].iter().any(|&b| b != 0) {
        return Err("the boot code is not int 18h".into());
    }
    Ok(Verdict::Accepted)
}

#[test]
fn fuzz_mbr_writer() {
    run(
        "mbr",
        1 << 20,
        |rng| {
            let any = |rng: &mut Rng| rng.extreme(&[0, 1, 2048, u32::MAX], |r| r as u32);
            (any(rng), rng.next() as u8, any(rng), any(rng))
        },
        check_mbr,
        |input| format!("{input:?}"),
    );
}

// ---------------------------------------------------------------------------------------------
// Target 9: the cpio newc writer

struct CpioInput {
    entries: Vec<(cpio::Header, Vec<u8>, Vec<u8>)>,
}

fn generate_cpio(rng: &mut Rng) -> CpioInput {
    let entries = (0..rng.size(12))
        .map(|_| {
            let any = |rng: &mut Rng| rng.extreme(&[0, 1, 0o100755, 0o40755, u32::MAX], |r| r as u32);
            let header = cpio::Header {
                ino: any(rng),
                mode: any(rng),
                nlink: any(rng),
                rdev_major: any(rng),
                rdev_minor: any(rng),
            };
            let name_len = 1 + rng.size(300);
            let mut name: Vec<u8> = rng.bytes(name_len).into_iter().map(|b| b.max(1)).collect();
            if rng.percent(3) {
                let at = rng.below(name.len());
                name[at] = 0;
            }
            let data_len = rng.size(3000);
            (header, name, rng.bytes(data_len))
        })
        .collect();
    CpioInput { entries }
}

/// An entry's thirteen header fields, name and data.
type NewcEntry = ([u32; 13], Vec<u8>, Vec<u8>);

/// Reads a newc archive strictly: magic, hex fields, NUL-terminated names, zero padding to 4
/// bytes, ending exactly after the trailer.
fn read_newc(bytes: &[u8]) -> Result<Vec<NewcEntry>, String> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let header = bytes.get(at..at + cpio::HEADER_LEN).ok_or(format!("no header at {at}"))?;
        if &header[..6] != cpio::MAGIC {
            return Err(format!("no magic at {at}"));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let text = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).map_err(|_| "a field is not ASCII")?;
            if text.bytes().any(|b| !b.is_ascii_hexdigit() || b.is_ascii_uppercase()) {
                return Err(format!("field {i} at {at} is {text:?}"));
            }
            *field = u32::from_str_radix(text, 16).unwrap();
        }
        let (size, name_size) = (fields[6] as usize, fields[11] as usize);
        let name_at = at + cpio::HEADER_LEN;
        let name = bytes.get(name_at..name_at + name_size).ok_or("the name runs past the end")?;
        if name.last() != Some(&0) || name[..name_size - 1].contains(&0) {
            return Err(format!("the name at {at} is not one NUL-terminated string"));
        }
        let data_at = (name_at + name_size).div_ceil(4) * 4;
        let end = data_at + size;
        let next = end.div_ceil(4) * 4;
        if bytes.get(name_at + name_size..data_at).map_or(true, |p| p.iter().any(|&b| b != 0))
            || bytes.get(end..next).map_or(true, |p| p.iter().any(|&b| b != 0))
        {
            return Err(format!("bad padding around the entry at {at}"));
        }
        let name = name[..name_size - 1].to_vec();
        let data = bytes[data_at..end].to_vec();
        at = next;
        if name == cpio::TRAILER {
            if at != bytes.len() {
                return Err("bytes after the trailer".into());
            }
            return Ok(entries);
        }
        entries.push((fields, name, data));
    }
}

fn check_cpio(input: &CpioInput) -> Result<Verdict, String> {
    let mut out = Vec::new();
    for (header, name, data) in &input.entries {
        if let Err(e) = cpio::write_entry(&mut out, header, name, data) {
            if !name.contains(&0) || e.kind() != io::ErrorKind::InvalidInput {
                return Err(format!("refused {name:?}: {e}"));
            }
            return Ok(Verdict::Refused("NUL in a name".into()));
        }
        if out.len() % 4 != 0 {
            return Err("an entry does not end at a multiple of 4".into());
        }
    }
    cpio::write_trailer(&mut out).map_err(|e| e.to_string())?;
    let read = read_newc(&out)?;
    if read.len() != input.entries.len() {
        return Err(format!("{} entries read back, {} written", read.len(), input.entries.len()));
    }
    for ((fields, name, data), (header, given_name, given_data)) in read.iter().zip(&input.entries) {
        let expected = [
            header.ino,
            header.mode,
            0,
            0,
            header.nlink,
            0,
            given_data.len() as u32,
            0,
            0,
            header.rdev_major,
            header.rdev_minor,
            given_name.len() as u32 + 1,
            0,
        ];
        if *fields != expected || name != given_name || data != given_data {
            return Err(format!("an entry read back as {fields:?}, written as {expected:?}"));
        }
    }
    Ok(Verdict::Accepted)
}

#[test]
fn fuzz_cpio_writer() {
    run("cpio", 16 << 20, generate_cpio, check_cpio, |input| {
        let shown: Vec<(cpio::Header, String, usize)> =
            input.entries.iter().map(|(h, n, d)| (*h, escaped(n), d.len())).collect();
        format!("{shown:?}")
    });
}

// ---------------------------------------------------------------------------------------------
// Target 10: the ELF reader

/// What a generated ELF file holds, and what the reader must find in it.
#[derive(Debug, Clone)]
struct ElfModel {
    machine: u16,
    interpreter: Option<Vec<u8>>,
    needed: Vec<String>,
    runpath: Option<Vec<u8>>,
    rpath: Option<Vec<u8>>,
    modinfo: Option<Vec<u8>>,
}

/// An ELF64 little-endian file: header, program headers (PT_INTERP, one PT_LOAD over the whole
/// file, PT_DYNAMIC), the interpreter, the dynamic string table and section, `.modinfo`, the
/// section name table and the section headers.
fn elf_bytes(model: &ElfModel) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let phnum = 3;
    let mut out = vec![0u8; 64 + 56 * phnum];
    let interp_at = out.len();
    out.extend(model.interpreter.iter().flat_map(|i| i.iter().copied().chain([0])));
    let mut strtab = vec![0u8];
    let mut string = |s: &[u8]| {
        let at = strtab.len() as u64;
        strtab.extend_from_slice(s);
        strtab.push(0);
        at
    };
    let mut dynamic: Vec<(u64, u64)> = model.needed.iter().map(|n| (1, string(n.as_bytes()))).collect();
    if let Some(r) = &model.runpath {
        dynamic.push((29, string(r)));
    }
    if let Some(r) = &model.rpath {
        dynamic.push((15, string(r)));
    }
    let strtab_at = out.len();
    out.extend_from_slice(&strtab);
    dynamic.push((5, BASE + strtab_at as u64));
    dynamic.push((10, strtab.len() as u64));
    dynamic.push((0, 0));
    let dynamic_at = out.len();
    for (tag, value) in &dynamic {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    let modinfo_at = out.len();
    out.extend(model.modinfo.iter().flatten());
    let shstrtab_at = out.len();
    out.extend_from_slice(b"\0.shstrtab\0.modinfo\0");
    let shoff = out.len();
    let section = |name: u32, kind: u32, offset: usize, size: usize| {
        let mut s = [0u8; 64];
        s[0..4].copy_from_slice(&name.to_le_bytes());
        s[4..8].copy_from_slice(&kind.to_le_bytes());
        s[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
        s[32..40].copy_from_slice(&(size as u64).to_le_bytes());
        s
    };
    let mut sections = vec![[0u8; 64], section(1, 3, shstrtab_at, 20)];
    if let Some(m) = &model.modinfo {
        sections.push(section(11, 1, modinfo_at, m.len()));
    }
    for s in &sections {
        out.extend_from_slice(s);
    }
    let total = out.len() as u64;
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2;
    out[5] = 1;
    out[6] = 1;
    put_u16(&mut out, 0x10, 3);
    put_u16(&mut out, 0x12, model.machine);
    put_u64(&mut out, 0x20, 64);
    put_u64(&mut out, 0x28, shoff as u64);
    put_u16(&mut out, 0x34, 64);
    put_u16(&mut out, 0x36, 56);
    put_u16(&mut out, 0x38, phnum as u16);
    put_u16(&mut out, 0x3a, 64);
    put_u16(&mut out, 0x3c, sections.len() as u16);
    put_u16(&mut out, 0x3e, 1);
    let interp_len = out.len().min(strtab_at) - interp_at;
    let phdrs = [
        (
            if model.interpreter.is_some() { 3u32 } else { 4 },
            interp_at as u64,
            BASE + interp_at as u64,
            interp_len as u64,
        ),
        (1, 0, BASE, total),
        (2, dynamic_at as u64, BASE + dynamic_at as u64, (dynamic.len() * 16) as u64),
    ];
    for (i, (kind, offset, vaddr, size)) in phdrs.into_iter().enumerate() {
        let at = 64 + 56 * i;
        put_u32(&mut out, at, kind);
        put_u64(&mut out, at + 8, offset);
        put_u64(&mut out, at + 16, vaddr);
        put_u64(&mut out, at + 32, size);
        put_u64(&mut out, at + 40, size);
    }
    out
}

fn elf_model(rng: &mut Rng) -> ElfModel {
    let word = |rng: &mut Rng, pieces: &[&str], max: usize| -> String {
        let n = 1 + rng.size(max);
        (0..n).map(|_| *rng.pick(pieces)).collect()
    };
    let lib = ["lib", "c", ".so", ".6", "ssl", "-", "_", "é", "x"];
    let dirs = ["/", "usr", "lib", "$ORIGIN", "${ORIGIN}", "..", ":", "::", "nix/store/abc"];
    ElfModel {
        machine: rng.extreme(&[62, 3, 183, 0, u16::MAX], |r| r as u16),
        interpreter: rng.percent(60).then(|| word(rng, &dirs[..3], 6).into_bytes()),
        needed: (0..rng.size(6)).map(|_| word(rng, &lib, 6)).collect(),
        runpath: rng.percent(30).then(|| word(rng, &dirs, 8).into_bytes()),
        rpath: rng.percent(30).then(|| word(rng, &dirs, 8).into_bytes()),
        modinfo: rng
            .percent(40)
            .then(|| word(rng, &["license=GPL\0", "depends=a,b\0", "name=x\0", "\0"], 4).into_bytes()),
    }
}

struct ElfInput {
    bytes: Vec<u8>,
    model: Option<ElfModel>,
}

fn damage_elf(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let len = bytes.len() as u64;
    let u64s = [0, 1, 8, 56, 64, len, len.saturating_sub(1), u64::MAX, u64::MAX - 7, 1 << 63, 0x40_0000];
    let u16s = [0, 1, 3, 55, 56, 64, 0xff00, 0xffff];
    match rng.below(8) {
        0 => {
            let at = *rng.pick(&[0x20, 0x28]);
            let v = rng.extreme(&u64s, |r| r);
            put_u64(bytes, at, v);
        }
        1 => {
            let at = *rng.pick(&[0x12, 0x36, 0x38, 0x3a, 0x3c, 0x3e]);
            let v = rng.extreme(&u16s, |r| r as u16);
            put_u16(bytes, at, v);
        }
        2 => {
            // A program header's type, offset, address or size.
            let at = 64 + 56 * rng.below(3) + *rng.pick(&[0, 8, 16, 32]);
            let v = rng.extreme(&u64s, |r| r);
            if at % 56 == 8 {
                put_u32(bytes, at, v as u32);
            } else {
                put_u64(bytes, at, v);
            }
        }
        3 if bytes.len() > 5 => bytes[*rng.pick(&[4, 5])] = *rng.pick(&[0, 1, 2, 3, 0xff]),
        4 if bytes.len() >= 16 => {
            // Anything that looks like a field, anywhere.
            let at = rng.below(bytes.len() / 8) * 8;
            let v = rng.extreme(&u64s, |r| r);
            put_u64(bytes, at, v);
        }
        5 => {
            let keep = rng.below(bytes.len() + 1);
            bytes.truncate(keep);
        }
        _ => damage_bytes(rng, bytes, &[b"\x7fELF", b"\0", b":", b"$ORIGIN"]),
    }
}

fn generate_elf(rng: &mut Rng, real: &[Vec<u8>]) -> ElfInput {
    if !real.is_empty() && rng.percent(10) {
        let mut bytes = rng.pick(real).clone();
        for _ in 0..1 + rng.size(3) {
            damage_elf(rng, &mut bytes);
        }
        return ElfInput { bytes, model: None };
    }
    let model = elf_model(rng);
    let mut bytes = elf_bytes(&model);
    if rng.percent(70) {
        for _ in 0..1 + rng.size(3) {
            damage_elf(rng, &mut bytes);
        }
        return ElfInput { bytes, model: None };
    }
    ElfInput { bytes, model: Some(model) }
}

fn check_elf(input: &ElfInput) -> Result<Verdict, String> {
    let kind = |e: &ParseError| {
        Verdict::Refused(
            match e {
                ParseError::NotElf => "NotElf",
                ParseError::Unsupported(_) => "Unsupported",
                ParseError::Malformed(_) => "Malformed",
            }
            .into(),
        )
    };
    let elf = match (Elf::parse(&input.bytes), &input.model) {
        (Ok(elf), _) => elf,
        (Err(e), None) => return Ok(kind(&e)),
        (Err(e), Some(_)) => return Err(format!("a valid file was refused: {e}")),
    };
    let modinfo = elf.section_by_name(".modinfo");
    let _ = elf.section_by_name(".not-there");
    let _ = elf.program_headers();
    let info = elf.dynamic_info();
    let Some(model) = &input.model else {
        return Ok(match (modinfo, info) {
            (Err(e), _) | (_, Err(e)) => kind(&e),
            _ => Verdict::Accepted,
        });
    };
    let info = info.map_err(|e| format!("dynamic information of a valid file: {e}"))?;
    let modinfo = modinfo.map_err(|e| format!(".modinfo of a valid file: {e}"))?;
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    let search = model.runpath.as_ref().or(model.rpath.as_ref());
    let expected_search: Vec<PathBuf> =
        search.map(|s| s.split(|&b| b == b':').filter(|d| !d.is_empty()).map(path).collect()).unwrap_or_default();
    let read = (elf.machine, &info.interpreter, &info.needed, &info.search_path, modinfo);
    let made = (
        model.machine,
        &model.interpreter.as_deref().map(path),
        &model.needed,
        &expected_search,
        model.modinfo.as_deref(),
    );
    if read != made {
        return Err(format!("read {read:?}, made {made:?}"));
    }
    Ok(Verdict::Accepted)
}

/// Up to two small shared libraries of this machine, as real-world seeds.
fn real_elf_seeds() -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for dir in ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut small: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".so"))
            .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
            .filter(|(len, _)| (8 << 10..64 << 10).contains(len))
            .collect();
        small.sort();
        found.extend(small.into_iter().take(2).filter_map(|(_, p)| std::fs::read(p).ok()));
        if !found.is_empty() {
            break;
        }
    }
    found
}

#[test]
fn fuzz_elf_reader() {
    let real = real_elf_seeds();
    run(
        "elf",
        16 << 20,
        |rng| generate_elf(rng, &real),
        check_elf,
        |input| format!("model {:?}, {} bytes: {}", input.model, input.bytes.len(), escaped(&input.bytes)),
    );
}

// ---------------------------------------------------------------------------------------------
// Target 11: the tar reader

#[derive(Debug, Clone, PartialEq, Eq)]
struct TarEntry {
    kind: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u64,
    data: Vec<u8>,
}

fn tar_header(name: &[u8], kind: u8, mode: u64, size: u64, link: &[u8], prefix: &[u8], gnu: bool) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 8u64.pow(11) {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        // GNU's base-256 for sizes octal cannot hold.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..265].copy_from_slice(if gnu { b"ustar  \0" } else { b"ustar\x0000" });
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn tar_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len += 1;
    }
    [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
}

/// An archive of `entries` as GNU tar, busybox and pax writers lay them out: names that fit
/// in the header, in ustar's prefix, in GNU long-name entries or in pax records.
fn tar_archive(rng: &mut Rng, entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if rng.percent(10) {
            let body = pax_record("comment", &rng.bytes(20));
            out.extend_from_slice(&tar_header(b"global", b'g', 0, body.len() as u64, b"", b"", false));
            tar_data(&mut out, &body);
        }
        let mut pax = Vec::new();
        let (mut name, mut prefix): (&[u8], &[u8]) = (&e.name, b"");
        if e.name.len() > 100 {
            let split =
                e.name.iter().rposition(|&b| b == b'/').filter(|&i| i <= 155 && e.name.len() - i - 1 <= 100 && i > 0);
            match (split, rng.below(3)) {
                (Some(i), 0) => (prefix, name) = (&e.name[..i], &e.name[i + 1..]),
                (_, 1) => {
                    let mut long = e.name.clone();
                    long.push(0);
                    out.extend_from_slice(&tar_header(b"././@LongLink", b'L', 0, long.len() as u64, b"", b"", true));
                    tar_data(&mut out, &long);
                    name = b"x";
                }
                _ => {
                    pax.extend(pax_record("path", &e.name));
                    name = b"x";
                }
            }
        }
        let mut link: &[u8] = &e.link;
        if e.link.len() > 100 {
            if rng.percent(50) {
                let mut long = e.link.clone();
                long.push(0);
                out.extend_from_slice(&tar_header(b"././@LongLink", b'K', 0, long.len() as u64, b"", b"", true));
                tar_data(&mut out, &long);
            } else {
                pax.extend(pax_record("linkpath", &e.link));
            }
            link = b"y";
        }
        let mut header_size = e.data.len() as u64;
        if rng.percent(10) {
            pax.extend(pax_record("size", e.data.len().to_string().as_bytes()));
            header_size = rng.next() % 100_000;
        }
        if !pax.is_empty() {
            if rng.percent(30) {
                pax.extend(pax_record("mtime", b"1700000000.5"));
            }
            out.extend_from_slice(&tar_header(b"PaxHeaders/x", b'x', 0o644, pax.len() as u64, b"", b"", false));
            tar_data(&mut out, &pax);
        }
        out.extend_from_slice(&tar_header(
            name,
            e.kind,
            e.mode,
            header_size,
            link,
            prefix,
            prefix.is_empty() && rng.percent(30),
        ));
        tar_data(&mut out, &e.data);
    }
    out.resize(out.len() + 512 * (1 + rng.below(2)), 0);
    out
}

fn tar_entries(rng: &mut Rng) -> Vec<TarEntry> {
    (0..rng.size(8))
        .map(|_| {
            let part = |rng: &mut Rng| -> Vec<u8> {
                let n = 1 + rng.size(40);
                (0..n).map(|_| *rng.pick(b"abcXYZ09._-\xc3\xa9 ")).collect()
            };
            let path = |rng: &mut Rng| -> Vec<u8> {
                let parts: Vec<Vec<u8>> = (0..1 + rng.size(8)).map(|_| part(rng)).collect();
                parts.join(&b'/')
            };
            let kind = *rng.pick(&[b'0', 0, b'7', b'5', b'2', b'1', b'3', b'6']);
            let data_len = if matches!(kind, b'0' | 0 | b'7') { rng.size(3000) } else { 0 };
            TarEntry {
                kind,
                name: path(rng),
                link: if matches!(kind, b'1' | b'2') { path(rng) } else { vec![] },
                mode: rng.next() & 0o7777,
                data: rng.bytes(data_len),
            }
        })
        .collect()
}

struct TarInput {
    bytes: Vec<u8>,
    expected: Option<Vec<TarEntry>>,
}

fn generate_tar(rng: &mut Rng) -> TarInput {
    let entries = tar_entries(rng);
    let mut bytes = tar_archive(rng, &entries);
    if rng.percent(30) {
        return TarInput { bytes, expected: Some(entries) };
    }
    for _ in 0..1 + rng.size(3) {
        let blocks = bytes.len() / 512;
        match rng.below(6) {
            0 if blocks > 0 => {
                // A header field of a block, checksum made right again or not.
                let at = rng.below(blocks) * 512;
                let (from, to) = *rng.pick(&[(100, 108), (124, 136), (148, 156), (156, 157), (257, 265), (345, 500)]);
                let field: Vec<u8> = match rng.below(4) {
                    0 => vec![0x80 | rng.next() as u8; to - from],
                    1 => std::iter::repeat(b'7').take(to - from).collect(),
                    2 => rng.bytes(to - from),
                    _ => vec![b' '; to - from],
                };
                bytes[at + from..at + to].copy_from_slice(&field);
                if rng.percent(70) {
                    bytes[at + 148..at + 156].copy_from_slice(b"        ");
                    let sum: u32 = bytes[at..at + 512].iter().map(|&b| u32::from(b)).sum();
                    bytes[at + 148..at + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                }
            }
            1 => {
                let keep = rng.below(bytes.len() + 1);
                bytes.truncate(keep);
            }
            _ => damage_bytes(rng, &mut bytes, &[b"ustar\0", b"././@LongLink", b"\0\0\0\0", b"1 path=\n"]),
        }
    }
    TarInput { bytes, expected: None }
}

fn check_tar(input: &TarInput) -> Result<Verdict, String> {
    let mut reader = tar::Reader::new(&input.bytes[..], 4096);
    let mut read = Vec::new();
    let outcome: Result<(), TarError> = (|| {
        while let Some(entry) = reader.next_entry()? {
            let mut data = Vec::new();
            if read.len() % 2 == 0 {
                reader.copy_data(&mut data).map_err(|e| match e {
                    CopyError::Archive(e) => e,
                    CopyError::Write(e) => TarError::Read(e),
                })?;
            }
            let mode = entry.mode()?;
            read.push(TarEntry { kind: entry.kind, name: entry.name, link: entry.link, mode, data });
        }
        Ok(())
    })();
    if reader.offset() > input.bytes.len() as u64 {
        return Err(format!("offset {} past the {}-byte stream", reader.offset(), input.bytes.len()));
    }
    match (outcome, &input.expected) {
        (Ok(()), Some(expected)) => {
            // Every other entry's data was skipped, not read.
            for (i, (got, made)) in read.iter().zip(expected).enumerate() {
                let wanted = TarEntry { data: if i % 2 == 0 { made.data.clone() } else { vec![] }, ..made.clone() };
                if *got != wanted {
                    return Err(format!("entry {i} read as {got:?}, made as {wanted:?}"));
                }
            }
            if read.len() != expected.len() {
                return Err(format!("{} entries read, {} made", read.len(), expected.len()));
            }
            Ok(Verdict::Accepted)
        }
        (Ok(()), None) => Ok(Verdict::Accepted),
        (Err(e), Some(_)) => Err(format!("a valid archive was refused: {e}")),
        (Err(e), None) => Ok(Verdict::Refused(match e {
            TarError::Read(_) => return Err(format!("a read error from memory: {e}")),
            TarError::Truncated { reading, .. } => format!("Truncated({reading})"),
            TarError::BadHeader { .. } => "BadHeader".into(),
        })),
    }
}

#[test]
fn fuzz_tar_reader() {
    run("tar", 16 << 20, generate_tar, check_tar, |input| {
        format!("expected {:?}, {} bytes: {}", input.expected, input.bytes.len(), escaped(&input.bytes))
    });
}

// ---------------------------------------------------------------------------------------------
// Target 12: the pcap writer

struct PcapInput {
    limit: u64,
    frames: Vec<(SystemTime, Vec<u8>)>,
}

fn generate_pcap(rng: &mut Rng) -> PcapInput {
    let limit = rng.extreme(&[0, 23, 24, 40, 100, 1 << 16, 1 << 20], |r| r % (1 << 18));
    let frames = (0..rng.size(40))
        .map(|_| {
            let len = rng.extreme(&[0, 1, 60, 1514, 9234, 65535, 65536, 70_000], |r| (r % 2000) as usize);
            let at = match rng.below(4) {
                0 => UNIX_EPOCH - Duration::from_secs(rng.next() % 1000 + 1),
                1 => {
                    UNIX_EPOCH
                        + Duration::new(u64::from(u32::MAX) + rng.next() % 1000, rng.next() as u32 % 1_000_000_000)
                }
                _ => UNIX_EPOCH + Duration::new(rng.next() % (1 << 32), rng.next() as u32 % 1_000_000_000),
            };
            (at, vec![rng.next() as u8; len])
        })
        .collect();
    PcapInput { limit, frames }
}

fn check_pcap(input: &PcapInput) -> Result<Verdict, String> {
    let mut w = PcapWriter::new(Vec::new(), input.limit).map_err(|e| e.to_string())?;
    let mut written = Vec::new();
    let mut size = pcap::FILE_HEADER_BYTES;
    for (at, frame) in &input.frames {
        let kept = frame.len().min(pcap::SNAPLEN as usize);
        let fits = size + pcap::RECORD_HEADER_BYTES + kept as u64 <= input.limit;
        match (w.frame(*at, frame).map_err(|e| e.to_string())?, fits) {
            (pcap::Frame::Written, true) => {
                size += pcap::RECORD_HEADER_BYTES + kept as u64;
                written.push((at, frame));
            }
            (pcap::Frame::Full, false) => {}
            (outcome, fits) => return Err(format!("a {}-byte frame was {outcome:?}; it fits: {fits}", frame.len())),
        }
    }
    if (w.bytes(), w.frames()) != (size, written.len() as u64) {
        return Err(format!("the writer counts {} bytes and {} frames", w.bytes(), w.frames()));
    }
    let out = w.finish().map_err(|e| e.to_string())?;
    if out.len() as u64 != size {
        return Err(format!("{} bytes written, {size} counted", out.len()));
    }
    let header: Vec<u32> = (0..6).map(|i| le32(&out, 4 * i)).collect();
    if header != [0xa1b2_c3d4, 0x0004_0002, 0, 0, 65535, 1] {
        return Err(format!("file header {header:x?}"));
    }
    let mut at = 24;
    for (time, frame) in written {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let kept = frame.len().min(65535);
        let record = [le32(&out, at), le32(&out, at + 4), le32(&out, at + 8), le32(&out, at + 12)];
        let made = [since.as_secs() as u32, since.subsec_micros(), kept as u32, frame.len() as u32];
        if record != made || out[at + 16..at + 16 + kept] != frame[..kept] {
            return Err(format!("record at {at}: {record:?}, made {made:?}"));
        }
        at += 16 + kept;
    }
    Ok(Verdict::Accepted)
}

#[test]
fn fuzz_pcap_writer() {
    run("pcap", 16 << 20, generate_pcap, check_pcap, |input| {
        let frames: Vec<(SystemTime, usize)> = input.frames.iter().map(|(t, f)| (*t, f.len())).collect();
        format!("limit {}, frames {frames:?}", input.limit)
    });
}

// ---------------------------------------------------------------------------------------------
// Target 13: PPM in, PNG out and back

enum PngInput {
    /// A screen: its PPM, which goes through the screenshot's path and back.
    Screen {
        width: u32,
        height: u32,
        pixels: Vec<u8>,
        ppm: Vec<u8>,
    },
    Ppm(Vec<u8>),
    Png(Vec<u8>),
}

fn ppm_of(rng: &mut Rng, width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
    let blank = |rng: &mut Rng| *rng.pick(&[" ", "\n", "\t", "  ", "\r\n"]);
    let comment = if rng.percent(30) { "# QEMU\n" } else { "" };
    let mut ppm = format!("P6{}{comment}{width}{}{height}{}255", blank(rng), blank(rng), blank(rng)).into_bytes();
    ppm.push(*rng.pick(b" \n\t"));
    ppm.extend_from_slice(pixels);
    ppm
}

/// A chunk's CRC made right again after its type or data changed.
fn reseal_chunks(png: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|e| e + 4 <= png.len()) else { return };
        let mut crc = Crc::new();
        crc.update(&png[at + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
        at = end + 4;
    }
}

fn generate_png(rng: &mut Rng) -> PngInput {
    let width = rng.extreme(&[1, 2, 720, 1], |r| 1 + (r % 64) as u32);
    let height = rng.extreme(&[1, 3, 1], |r| 1 + (r % 64) as u32);
    let (width, height) =
        if width as u64 * height as u64 > 64 * 64 { (width % 64 + 1, height) } else { (width, height) };
    let pixels = match rng.below(3) {
        0 => rng.bytes((width * height * 3) as usize),
        1 => vec![rng.next() as u8; (width * height * 3) as usize],
        _ => (0..width * height * 3).map(|i| (i / 3 % 7) as u8 * 30).collect(),
    };
    let ppm = ppm_of(rng, width, height, &pixels);
    match rng.below(10) {
        0..=2 => PngInput::Screen { width, height, pixels, ppm },
        3..=4 => {
            let mut ppm = ppm;
            for _ in 0..1 + rng.size(3) {
                damage_bytes(rng, &mut ppm, &[b"P6", b"255", b"65535", b"#", b"99999999999", b"\n", b"0 "]);
            }
            PngInput::Ppm(ppm)
        }
        _ => {
            let mut png = png::encode_rgb(width, height, &pixels).expect("a valid image");
            for _ in 0..1 + rng.size(3) {
                match rng.below(4) {
                    0 if png.len() >= 33 => {
                        // The header: size, depth, colour type.
                        let at = 16 + rng.below(10);
                        png[at] = *rng.pick(&[0, 1, 2, 3, 6, 8, 16, 0x40, 0xff]);
                    }
                    1 => {
                        // Other pixel data, of another length or not zlib at all.
                        let n = rng.size(5000);
                        let raw = rng.bytes(n);
                        let data = if rng.percent(70) {
                            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                            z.write_all(&raw).unwrap();
                            z.finish().unwrap()
                        } else {
                            raw
                        };
                        let idat_at = 33;
                        if png.len() < idat_at + 4 {
                            continue;
                        }
                        let old_len = u32::from_be_bytes(png[idat_at..idat_at + 4].try_into().unwrap()) as usize;
                        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
                        chunk.extend_from_slice(b"IDAT");
                        chunk.extend_from_slice(&data);
                        chunk.extend_from_slice(&[0; 4]);
                        if idat_at + 12 + old_len <= png.len() {
                            png.splice(idat_at..idat_at + 12 + old_len, chunk);
                        }
                    }
                    _ => damage_bytes(rng, &mut png, &[b"IHDR", b"IDAT", b"IEND", b"\xff\xff\xff\xff", b"\0\0\0\0"]),
                }
            }
            if rng.percent(70) {
                reseal_chunks(&mut png);
            }
            PngInput::Png(png)
        }
    }
}

fn check_png(input: &PngInput) -> Result<Verdict, String> {
    match input {
        PngInput::Screen { width, height, pixels, ppm } => {
            let (w, h, px) = ppm::parse(ppm).map_err(|e| format!("a valid PPM was refused: {e}"))?;
            if (w, h, px) != (*width, *height, &pixels[..]) {
                return Err(format!("the PPM read as {w}x{h}"));
            }
            let png = png::encode_rgb(w, h, px).map_err(|e| e.to_string())?;
            match png::decode(&png) {
                Ok((w, h, px)) if (w, h) == (*width, *height) && px == *pixels => Ok(Verdict::Accepted),
                Ok((w, h, _)) => Err(format!("the PNG read back as {w}x{h} or other pixels")),
                Err(e) => Err(format!("the PNG written was refused: {e}")),
            }
        }
        PngInput::Ppm(bytes) => match ppm::parse(bytes) {
            Ok((w, h, px)) if px.len() != (w * h * 3) as usize => Err(format!("{w}x{h} with {} bytes", px.len())),
            Ok(_) => Ok(Verdict::Accepted),
            Err(e) => Ok(Verdict::Refused(format!("ppm: {e:?}"))),
        },
        PngInput::Png(bytes) => match png::decode(bytes) {
            Ok((w, h, px)) if px.len() as u64 != u64::from(w) * u64::from(h) * 3 => {
                Err(format!("{w}x{h} with {} bytes", px.len()))
            }
            Ok(_) => Ok(Verdict::Accepted),
            Err(e) => {
                Ok(Verdict::Refused(format!("png: {}", format!("{e:?}").split([' ', '{', '(']).next().unwrap_or(""))))
            }
        },
    }
}

#[test]
fn fuzz_png_codec() {
    run("png", 16 << 20, generate_png, check_png, |input| match input {
        PngInput::Screen { width, height, .. } => format!("a {width}x{height} screen"),
        PngInput::Ppm(b) => format!("PPM {}", escaped(b)),
        PngInput::Png(b) => format!("PNG {}", escaped(b)),
    });
}

// ---------------------------------------------------------------------------------------------
// Target 14: MD4

/// MD4 as RFC 1320 writes it, one step at a time with the four words rotating through their
/// roles: a second implementation, written apart from src/format/md4.rs.
fn md4_reference(message: &[u8]) -> [u8; 16] {
    let mut h: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut data = message.to_vec();
    data.push(0x80);
    let padded = (data.len() + 8).div_ceil(64) * 64;
    data.resize(padded - 8, 0);
    data.extend_from_slice(&(message.len() as u64 * 8).to_le_bytes());
    type Round = (fn(u32, u32, u32) -> u32, u32, [usize; 16], [u32; 4]);
    let rounds: [Round; 3] = [
        (|x, y, z| (x & y) | (!x & z), 0, std::array::from_fn(|i| i), [3, 7, 11, 19]),
        (
            |x, y, z| (x & y) | (x & z) | (y & z),
            0x5a82_7999,
            [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15],
            [3, 5, 9, 13],
        ),
        (|x, y, z| x ^ y ^ z, 0x6ed9_eba1, [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15], [3, 9, 11, 15]),
    ];
    for block in data.chunks(64) {
        let x: Vec<u32> = block.chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
        let [mut a, mut b, mut c, mut d] = h;
        for (function, constant, order, shifts) in rounds {
            for (step, &k) in order.iter().enumerate() {
                let t = a
                    .wrapping_add(function(b, c, d))
                    .wrapping_add(x[k])
                    .wrapping_add(constant)
                    .rotate_left(shifts[step % 4]);
                (a, b, c, d) = (d, t, b, c);
            }
        }
        for (word, v) in h.iter_mut().zip([a, b, c, d]) {
            *word = word.wrapping_add(v);
        }
    }
    let mut out = [0u8; 16];
    for (chunk, word) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[test]
fn fuzz_md4_digest() {
    assert_eq!(md4_reference(b"abc"), md4::digest(b"abc"));
    run(
        "md4",
        1 << 20,
        |rng| {
            let len = rng.extreme(&[0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000], |r| (r % 300) as usize);
            rng.bytes(len)
        },
        |message| {
            let (ours, reference) = (md4::digest(message), md4_reference(message));
            if ours != reference {
                return Err(format!("{ours:02x?}, the reference says {reference:02x?}"));
            }
            Ok(Verdict::Accepted)
        },
        |message| escaped(message),
    );
}

// ---------------------------------------------------------------------------------------------
// Target 15: memory page records

#[test]
fn fuzz_memory_page_records() {
    use nix_winvm::format::memory::{PageSink, PageWriter, PAGE, RECORD};
    run(
        "memory pages",
        1 << 20,
        |rng| {
            // Records of random indices and fills, cut at a random length, fed in random pieces.
            let n = rng.extreme(&[0, 1, 2], |r| (r % 6) as usize);
            let records: Vec<(u64, u8)> = (0..n).map(|_| (rng.next(), rng.next() as u8)).collect();
            let mut w = PageWriter::new(Vec::new());
            for (index, fill) in &records {
                w.put(*index, &vec![*fill; PAGE]).unwrap();
            }
            let mut bytes = w.into_inner();
            let cut =
                rng.extreme(&[bytes.len(), 0, 1, 8, RECORD - 1, RECORD + 1], |r| (r as usize) % (bytes.len() + 1));
            bytes.truncate(cut.min(bytes.len()));
            let piece = 1 + (rng.next() as usize) % (2 * RECORD);
            (records, bytes, piece)
        },
        |(records, bytes, piece)| {
            let mut seen = Vec::new();
            let mut sink = PageSink::new(|index, page: &[u8]| {
                if page.len() != PAGE || page.iter().any(|b| *b != page[0]) {
                    return Err(std::io::Error::other("a page came back changed"));
                }
                seen.push((index, page[0]));
                Ok(())
            });
            for chunk in bytes.chunks(*piece) {
                std::io::Write::write_all(&mut sink, chunk).map_err(|e| e.to_string())?;
            }
            let finished = sink.finish();
            let whole = bytes.len() / RECORD;
            if seen[..] != records[..whole] {
                return Err(format!("read {seen:?}, wrote {:?}", &records[..whole]));
            }
            match (finished, bytes.len() % RECORD) {
                (Ok(n), 0) if n as usize == whole => Ok(Verdict::Accepted),
                (Err(e), r) if r != 0 && e.to_string().contains("ends inside a record") => {
                    Ok(Verdict::Refused("cut".into()))
                }
                (got, r) => Err(format!("{} bytes ({r} past the last whole record): {got:?}", bytes.len())),
            }
        },
        |(records, bytes, piece)| format!("{} records, {} bytes, pieces of {piece}", records.len(), bytes.len()),
    );
}
