//! The image list of a WIM file (install.wim, or install.esd, which has the same header and
//! XML): read from its header and XML data alone, never from the file data.
//!
//! The header (208 bytes at offset 0) gives the place of the XML data; the XML is stored
//! uncompressed as UTF-16LE with a byte order mark, and can sit at the end of a
//! multi-gigabyte file. Its structure is fixed and small, so a tiny tree parser here reads
//! it, with no XML crate.

use super::iso::{Iso, IsoError};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where Windows Setup takes the images from; an ESD is a WIM with solid compression.
pub const INSTALL_IMAGE_PATHS: [&str; 2] = ["sources/install.wim", "sources/install.esd"];

const MAGIC: &[u8; 8] = b"MSWIM\0\0\0";
/// Pipable WIMs (wimlib's `--pipable`) start with this instead.
const PIPABLE_MAGIC: &[u8; 8] = b"WLPWM\0\0\0";
pub const HEADER_LEN: usize = 208;
/// The XML data's resource header in the WIM header: 7-byte stored size, 1 flag byte,
/// 8-byte offset, 8-byte original size.
const XML_RESOURCE_AT: usize = 72;
const IMAGE_COUNT_AT: usize = 44;
const RESOURCE_COMPRESSED: u8 = 0x04;
/// Real install.wim XML is tens of kilobytes; this bound stops a damaged header from asking
/// for gigabytes.
const MAX_XML_BYTES: u64 = 64 << 20;

/// One image of a WIM, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WimImage {
    pub index: u32,
    /// What Setup's `/IMAGE/NAME` matches, e.g. "Windows Server 2022 SERVERSTANDARD".
    pub name: String,
    /// What people see, e.g. "Windows Server 2022 Standard (Desktop Experience)".
    pub display_name: Option<String>,
    /// WINDOWS/EDITIONID, e.g. "Professional", "ServerStandardEval".
    pub edition_id: Option<String>,
    /// WINDOWS/INSTALLATIONTYPE: "Client", "Server", "Server Core".
    pub installation_type: Option<String>,
    /// WINDOWS/VERSION/BUILD: Server 2016, 2019, 2022 and 2025 share their EditionIDs.
    pub build: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WimHeader {
    pub image_count: u32,
    pub xml_offset: u64,
    pub xml_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WimError {
    TooShort { size: u64 },
    BadMagic,
    Pipable,
    BadHeaderSize(u32),
    XmlCompressed,
    XmlOutsideFile { offset: u64, size: u64, file_size: u64 },
    XmlTooLarge { size: u64 },
    NoByteOrderMark,
    Xml(String),
    NoImages,
}

impl fmt::Display for WimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WimError::TooShort { size } => {
                write!(f, "it is {size} bytes, shorter than the {HEADER_LEN}-byte WIM header")
            }
            WimError::BadMagic => write!(f, "it does not start with the WIM magic \"MSWIM\""),
            WimError::Pipable => write!(f, "it is a pipable WIM, which install media do not use"),
            WimError::BadHeaderSize(n) => write!(f, "its header claims {n} bytes, not {HEADER_LEN}"),
            WimError::XmlCompressed => write!(f, "its XML data are marked compressed, which WIMs never do"),
            WimError::XmlOutsideFile { offset, size, file_size } => write!(
                f,
                "its XML data would be bytes {offset}..{} but the file is {file_size} bytes",
                offset.saturating_add(*size)
            ),
            WimError::XmlTooLarge { size } => write!(f, "its XML data claim {size} bytes, implausibly many"),
            WimError::NoByteOrderMark => write!(f, "its XML data do not start with a UTF-16LE byte order mark"),
            WimError::Xml(detail) => write!(f, "its XML data: {detail}"),
            WimError::NoImages => write!(f, "its XML data list no image"),
        }
    }
}

impl std::error::Error for WimError {}

pub fn parse_header(header: &[u8], file_size: u64) -> Result<WimHeader, WimError> {
    if header.len() < HEADER_LEN || file_size < HEADER_LEN as u64 {
        return Err(WimError::TooShort { size: file_size.min(header.len() as u64) });
    }
    if &header[..8] == PIPABLE_MAGIC {
        return Err(WimError::Pipable);
    }
    if &header[..8] != MAGIC {
        return Err(WimError::BadMagic);
    }
    let header_size = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if header_size as usize != HEADER_LEN {
        return Err(WimError::BadHeaderSize(header_size));
    }
    let res = &header[XML_RESOURCE_AT..XML_RESOURCE_AT + 24];
    let mut size_bytes = [0u8; 8];
    size_bytes[..7].copy_from_slice(&res[..7]);
    let xml_size = u64::from_le_bytes(size_bytes);
    let flags = res[7];
    let xml_offset = u64::from_le_bytes(res[8..16].try_into().unwrap());
    if flags & RESOURCE_COMPRESSED != 0 {
        return Err(WimError::XmlCompressed);
    }
    if xml_size > MAX_XML_BYTES {
        return Err(WimError::XmlTooLarge { size: xml_size });
    }
    if !xml_offset.checked_add(xml_size).is_some_and(|end| end <= file_size) {
        return Err(WimError::XmlOutsideFile { offset: xml_offset, size: xml_size, file_size });
    }
    let image_count = u32::from_le_bytes(header[IMAGE_COUNT_AT..IMAGE_COUNT_AT + 4].try_into().unwrap());
    Ok(WimHeader { image_count, xml_offset, xml_size })
}

/// The images the XML data (UTF-16LE with its byte order mark) list, by index.
pub fn parse_xml(data: &[u8]) -> Result<Vec<WimImage>, WimError> {
    let Some(body) = data.strip_prefix(&[0xFF, 0xFE]) else {
        return Err(WimError::NoByteOrderMark);
    };
    let units: Vec<u16> = body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let text = String::from_utf16(&units).map_err(|_| WimError::Xml("not valid UTF-16".into()))?;
    // Some writers end the document with a NUL.
    let root = xml::parse(text.trim_end_matches('\0')).map_err(WimError::Xml)?;
    if root.name != "WIM" {
        return Err(WimError::Xml(format!("the root element is <{}>, not <WIM>", root.name)));
    }
    let mut images = Vec::new();
    for image in root.children.iter().filter(|c| c.name == "IMAGE") {
        let index = image
            .attr("INDEX")
            .and_then(|i| i.trim().parse().ok())
            .ok_or_else(|| WimError::Xml("an <IMAGE> has no numeric INDEX".into()))?;
        let text = |path: &[&str]| image.find(path).map(|e| e.text.trim().to_owned());
        images.push(WimImage {
            index,
            name: text(&["NAME"]).unwrap_or_default(),
            display_name: text(&["DISPLAYNAME"]),
            edition_id: text(&["WINDOWS", "EDITIONID"]),
            installation_type: text(&["WINDOWS", "INSTALLATIONTYPE"]),
            build: text(&["WINDOWS", "VERSION", "BUILD"]).and_then(|b| b.parse().ok()),
        });
    }
    if images.is_empty() {
        return Err(WimError::NoImages);
    }
    images.sort_by_key(|i| i.index);
    Ok(images)
}

/// Reads header and XML through `read(offset, len)` from a WIM of `size` bytes.
fn read_images<E>(
    size: u64,
    read: impl Fn(u64, usize) -> Result<Vec<u8>, E>,
    wim_error: impl Fn(WimError) -> E,
) -> Result<Vec<WimImage>, E> {
    if size < HEADER_LEN as u64 {
        return Err(wim_error(WimError::TooShort { size }));
    }
    let header = parse_header(&read(0, HEADER_LEN)?, size).map_err(&wim_error)?;
    let xml = read(header.xml_offset, header.xml_size as usize)?;
    parse_xml(&xml).map_err(wim_error)
}

/// The install image of an ISO and the images it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallImages {
    pub iso: PathBuf,
    /// The path inside the ISO, as the ISO spells it.
    pub file: String,
    pub images: Vec<WimImage>,
}

#[derive(Debug)]
pub enum InstallImagesError {
    Iso(IsoError),
    Wim { iso: PathBuf, file: String, error: WimError },
}

impl fmt::Display for InstallImagesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallImagesError::Iso(e) => write!(f, "{e}"),
            InstallImagesError::Wim { iso, file, error } => {
                write!(f, "the ISO {}: {file} is not a WIM Windows Setup can read: {error}", iso.display())
            }
        }
    }
}

impl std::error::Error for InstallImagesError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InstallImagesError::Iso(e) => Some(e),
            InstallImagesError::Wim { error, .. } => Some(error),
        }
    }
}

/// The images of the ISO's `sources/install.wim` (or `install.esd`).
pub fn install_images(iso_path: &Path) -> Result<InstallImages, InstallImagesError> {
    let iso = Iso::open(iso_path).map_err(InstallImagesError::Iso)?;
    let file = iso.find_first(&INSTALL_IMAGE_PATHS).map_err(InstallImagesError::Iso)?;
    let images = read_images(
        file.size,
        |offset, len| iso.read(&file, offset, len).map_err(InstallImagesError::Iso),
        |error| InstallImagesError::Wim { iso: iso_path.to_path_buf(), file: file.path.clone(), error },
    )?;
    Ok(InstallImages { iso: iso_path.to_path_buf(), file: file.path, images })
}

/// The images of a WIM file on disk (wiminfo's view, for tests and tools).
pub fn images_in_file(path: &Path) -> Result<Vec<WimImage>, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| format!("reading {}: {e}", path.display()))?.len();
    read_images(
        size,
        |offset, len| {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map_err(|e| format!("reading {}: {e}", path.display()))?;
            Ok(buf)
        },
        |e| format!("{}: {e}", path.display()),
    )
}

/// Just enough XML for a WIM's XML data: elements, attributes, text, the five predefined
/// entities and character references; comments, processing instructions and declarations
/// are skipped.
mod xml {
    #[derive(Debug, Default)]
    pub struct Element {
        pub name: String,
        pub attrs: Vec<(String, String)>,
        pub children: Vec<Element>,
        pub text: String,
    }

    impl Element {
        pub fn attr(&self, name: &str) -> Option<&str> {
            self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }

        /// The first descendant along `path` of child names.
        pub fn find(&self, path: &[&str]) -> Option<&Element> {
            let (first, rest) = path.split_first()?;
            let child = self.children.iter().find(|c| c.name == *first)?;
            if rest.is_empty() {
                Some(child)
            } else {
                child.find(rest)
            }
        }
    }

    const MAX_DEPTH: usize = 64;

    pub fn parse(doc: &str) -> Result<Element, String> {
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        let mut rest = doc.trim_start_matches('\u{feff}');
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('<') {
                if let Some(body) = after.strip_prefix("!--") {
                    rest = skip_past(body, "-->")?;
                } else if after.starts_with('?') || after.starts_with('!') {
                    rest = skip_past(after, ">")?;
                } else if let Some(body) = after.strip_prefix('/') {
                    let end = body.find('>').ok_or("an end tag is not closed")?;
                    let name = body[..end].trim();
                    let element = stack.pop().ok_or_else(|| format!("</{name}> closes nothing"))?;
                    if element.name != name {
                        return Err(format!("<{}> is closed by </{name}>", element.name));
                    }
                    rest = &body[end + 1..];
                    attach(&mut stack, &mut root, element)?;
                } else {
                    let end = tag_end(after).ok_or("a start tag is not closed")?;
                    let (tag, self_closing) = match after[..end].strip_suffix('/') {
                        Some(tag) => (tag, true),
                        None => (&after[..end], false),
                    };
                    let element = start_tag(tag)?;
                    rest = &after[end + 1..];
                    if self_closing {
                        attach(&mut stack, &mut root, element)?;
                    } else if stack.len() >= MAX_DEPTH {
                        return Err("elements are nested too deeply".into());
                    } else {
                        stack.push(element);
                    }
                }
            } else {
                let end = rest.find('<').unwrap_or(rest.len());
                let text = unescape(&rest[..end])?;
                match stack.last_mut() {
                    Some(open) => open.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err("text outside the root element".into()),
                }
                rest = &rest[end..];
            }
        }
        if let Some(open) = stack.last() {
            return Err(format!("<{}> is never closed", open.name));
        }
        root.ok_or_else(|| "no root element".into())
    }

    fn attach(stack: &mut [Element], root: &mut Option<Element>, element: Element) -> Result<(), String> {
        match stack.last_mut() {
            Some(parent) => parent.children.push(element),
            None if root.is_none() => *root = Some(element),
            None => return Err(format!("a second root element <{}>", element.name)),
        }
        Ok(())
    }

    fn skip_past<'a>(s: &'a str, end: &str) -> Result<&'a str, String> {
        s.find(end).map(|i| &s[i + end.len()..]).ok_or_else(|| format!("a markup declaration has no \"{end}\""))
    }

    /// The '>' ending a start tag, outside quoted attribute values.
    fn tag_end(s: &str) -> Option<usize> {
        let mut quote = None;
        for (i, c) in s.char_indices() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), _) if c == q => quote = None,
                (None, '>') => return Some(i),
                _ => {}
            }
        }
        None
    }

    fn start_tag(tag: &str) -> Result<Element, String> {
        let tag = tag.trim();
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.is_empty() {
            return Err("a start tag has no name".into());
        }
        let mut element = Element { name: name.to_owned(), ..Element::default() };
        let mut rest = tag[name_end..].trim_start();
        while !rest.is_empty() {
            let eq = rest.find('=').ok_or_else(|| format!("<{name}> has an attribute without a value"))?;
            let key = rest[..eq].trim().to_owned();
            let value_part = rest[eq + 1..].trim_start();
            let quote = value_part.chars().next().filter(|c| *c == '"' || *c == '\'');
            let quote = quote.ok_or_else(|| format!("<{name}>'s attribute {key} is not quoted"))?;
            let close =
                value_part[1..].find(quote).ok_or_else(|| format!("<{name}>'s attribute {key} is not closed"))?;
            element.attrs.push((key, unescape(&value_part[1..1 + close])?));
            rest = value_part[close + 2..].trim_start();
        }
        Ok(element)
    }

    fn unescape(s: &str) -> Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            let after = &rest[amp + 1..];
            let semi = after.find(';').ok_or("an entity reference has no ';'")?;
            let entity = &after[..semi];
            let c = match entity {
                "lt" => '<',
                "gt" => '>',
                "amp" => '&',
                "quot" => '"',
                "apos" => '\'',
                _ => {
                    let code = if let Some(hex) = entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                        u32::from_str_radix(hex, 16).ok()
                    } else {
                        entity.strip_prefix('#').and_then(|d| d.parse().ok())
                    };
                    code.and_then(char::from_u32).ok_or_else(|| format!("unknown entity &{entity};"))?
                }
            };
            out.push(c);
            rest = &after[semi + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_nesting_attributes_entities_and_skips_markup() {
            let doc = "<?xml version=\"1.0\"?><!-- c --><A x='1' y=\"a&gt;b\"><B>t &amp; &#65;&#x42;</B><C/>tail</A>";
            let root = parse(doc).unwrap();
            assert_eq!(root.attr("y"), Some("a>b"));
            assert_eq!(root.find(&["B"]).unwrap().text, "t & AB");
            assert!(root.find(&["C"]).is_some());
            assert_eq!(root.text, "tail");
        }

        #[test]
        fn malformed_documents_are_errors() {
            assert_eq!(parse("<A><B></A>").unwrap_err(), "<B> is closed by </A>");
            assert_eq!(parse("<A>").unwrap_err(), "<A> is never closed");
            assert_eq!(parse("<A/><B/>").unwrap_err(), "a second root element <B>");
            assert_eq!(parse("<A>&nbsp;</A>").unwrap_err(), "unknown entity &nbsp;");
            assert_eq!(parse("<A x=1/>").unwrap_err(), "<A>'s attribute x is not quoted");
            assert_eq!(parse("").unwrap_err(), "no root element");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guest::windows::test_util::{temp_path, tool_available};
    use std::process::Command;

    pub fn utf16le_with_bom(s: &str) -> Vec<u8> {
        let mut out = vec![0xFF, 0xFE];
        out.extend(s.encode_utf16().flat_map(u16::to_le_bytes));
        out
    }

    /// A WIM's header and XML, nothing else: all a reader of the image list looks at.
    pub fn wim_bytes(xml: &str) -> Vec<u8> {
        let xml = utf16le_with_bom(xml);
        let mut out = vec![0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[IMAGE_COUNT_AT..IMAGE_COUNT_AT + 4].copy_from_slice(&1u32.to_le_bytes());
        out[XML_RESOURCE_AT..XML_RESOURCE_AT + 7].copy_from_slice(&(xml.len() as u64).to_le_bytes()[..7]);
        out[XML_RESOURCE_AT + 7] = 0x02;
        out[XML_RESOURCE_AT + 8..XML_RESOURCE_AT + 16].copy_from_slice(&(HEADER_LEN as u64 + 100).to_le_bytes());
        out[XML_RESOURCE_AT + 16..XML_RESOURCE_AT + 24].copy_from_slice(&(xml.len() as u64).to_le_bytes());
        out.extend(vec![0xAB; 100]);
        out.extend(xml);
        out
    }

    /// The shape of a real server install.wim's XML (fields trimmed).
    pub const SERVER_XML: &str = "<WIM><TOTALBYTES>5000</TOTALBYTES>\
        <IMAGE INDEX=\"2\"><NAME>Windows Server 2022 SERVERSTANDARD</NAME>\
        <DESCRIPTION>Standard &amp; more</DESCRIPTION>\
        <WINDOWS><ARCH>9</ARCH><PRODUCTNAME>Microsoft® Windows® Operating System</PRODUCTNAME>\
        <EDITIONID>ServerStandard</EDITIONID><INSTALLATIONTYPE>Server</INSTALLATIONTYPE>\
        <LANGUAGES><LANGUAGE>en-US</LANGUAGE><DEFAULT>en-US</DEFAULT></LANGUAGES>\
        <VERSION><MAJOR>10</MAJOR><MINOR>0</MINOR><BUILD>20348</BUILD><SPBUILD>587</SPBUILD></VERSION></WINDOWS>\
        <DISPLAYNAME>Windows Server 2022 Standard (Desktop Experience)</DISPLAYNAME></IMAGE>\
        <IMAGE INDEX=\"1\"><NAME>Windows Server 2022 SERVERSTANDARDCORE</NAME>\
        <WINDOWS><EDITIONID>ServerStandard</EDITIONID><INSTALLATIONTYPE>Server Core</INSTALLATIONTYPE></WINDOWS></IMAGE>\
        </WIM>";

    #[test]
    fn reads_the_images_of_hand_made_bytes() {
        let bytes = wim_bytes(SERVER_XML);
        let header = parse_header(&bytes[..HEADER_LEN], bytes.len() as u64).unwrap();
        assert_eq!(header.xml_offset, HEADER_LEN as u64 + 100);
        let images = parse_xml(&bytes[header.xml_offset as usize..]).unwrap();
        assert_eq!(
            images,
            [
                WimImage {
                    index: 1,
                    name: "Windows Server 2022 SERVERSTANDARDCORE".into(),
                    display_name: None,
                    edition_id: Some("ServerStandard".into()),
                    installation_type: Some("Server Core".into()),
                    build: None,
                },
                WimImage {
                    index: 2,
                    name: "Windows Server 2022 SERVERSTANDARD".into(),
                    display_name: Some("Windows Server 2022 Standard (Desktop Experience)".into()),
                    edition_id: Some("ServerStandard".into()),
                    installation_type: Some("Server".into()),
                    build: Some(20348),
                },
            ]
        );
    }

    #[test]
    fn header_errors_say_what_is_wrong() {
        let good = wim_bytes(SERVER_XML);
        let size = good.len() as u64;
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(parse_header(&bad, size).unwrap_err().to_string(), "it does not start with the WIM magic \"MSWIM\"");
        let mut compressed = good.clone();
        compressed[XML_RESOURCE_AT + 7] |= RESOURCE_COMPRESSED;
        assert_eq!(parse_header(&compressed, size), Err(WimError::XmlCompressed));
        assert_eq!(
            parse_header(&good, size - 1).unwrap_err().to_string(),
            format!("its XML data would be bytes 308..{size} but the file is {} bytes", size - 1)
        );
        assert_eq!(parse_header(&good[..100], 100), Err(WimError::TooShort { size: 100 }));
        assert_eq!(parse_xml(b"<\0W\0>\0"), Err(WimError::NoByteOrderMark));
        assert_eq!(parse_xml(&utf16le_with_bom("<WIM><TOTALBYTES>1</TOTALBYTES></WIM>")), Err(WimError::NoImages));
        assert_eq!(
            parse_xml(&utf16le_with_bom("<WIM><IMAGE><NAME>x</NAME></IMAGE></WIM>")).unwrap_err().to_string(),
            "its XML data: an <IMAGE> has no numeric INDEX"
        );
    }

    /// wimlib writes a real WIM; EditionIDs set as image properties, as Microsoft's tools do.
    pub fn wimcapture_two_images(dir: &Path) -> Option<PathBuf> {
        if !tool_available("wimcapture") {
            return None;
        }
        std::fs::create_dir_all(dir.join("content")).unwrap();
        std::fs::write(dir.join("content/file.txt"), b"content").unwrap();
        let wim = dir.join("install.wim");
        for (i, (name, edition)) in [("Windows 11 Home", "Core"), ("Windows 11 Pro", "Professional")].iter().enumerate()
        {
            let o = Command::new(if i == 0 { "wimcapture" } else { "wimappend" })
                .arg(dir.join("content"))
                .arg(&wim)
                .arg(name)
                .args(["--image-property", &format!("WINDOWS/EDITIONID={edition}")])
                .args(["--image-property", "WINDOWS/VERSION/BUILD=26100"])
                .args(["--image-property", &format!("DISPLAYNAME={name}")])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        Some(wim)
    }

    #[test]
    fn reads_the_images_of_a_wim_wimlib_made() {
        let dir = temp_path("wimlib");
        let Some(wim) = wimcapture_two_images(&dir) else { return };
        let images = images_in_file(&wim).unwrap();
        let summary: Vec<_> =
            images.iter().map(|i| (i.index, i.name.as_str(), i.edition_id.as_deref(), i.build)).collect();
        assert_eq!(
            summary,
            [
                (1, "Windows 11 Home", Some("Core"), Some(26100)),
                (2, "Windows 11 Pro", Some("Professional"), Some(26100))
            ]
        );
        assert_eq!(images[1].display_name.as_deref(), Some("Windows 11 Pro"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_the_images_of_a_wim_inside_an_iso() {
        let dir = temp_path("wim-iso");
        let Some(wim) = wimcapture_two_images(&dir) else { return };
        if !tool_available("genisoimage") {
            return;
        }
        std::fs::create_dir_all(dir.join("tree/sources")).unwrap();
        std::fs::rename(&wim, dir.join("tree/sources/install.wim")).unwrap();
        let iso = dir.join("win.iso");
        let make_iso = || {
            let o = Command::new("genisoimage").args(["-quiet", "-udf", "-o"]).arg(&iso).arg(dir.join("tree")).output();
            let o = o.unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        make_iso();
        let found = install_images(&iso).unwrap();
        assert_eq!(found.file, "sources/install.wim");
        assert_eq!(found.images.len(), 2);
        // Not a WIM at that path: the message names the ISO and the file.
        std::fs::write(dir.join("tree/sources/install.wim"), vec![0u8; 4096]).unwrap();
        make_iso();
        assert_eq!(
            install_images(&iso).unwrap_err().to_string(),
            format!(
                "the ISO {}: sources/install.wim is not a WIM Windows Setup can read: it does not start with the WIM magic \"MSWIM\"",
                iso.display()
            )
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
