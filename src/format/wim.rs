//! The image list of a WIM file (install.wim, or install.esd, which has the same header and
//! XML): read from its header and XML data alone, never from the file data.
//!
//! The header (208 bytes at offset 0) gives the place of the XML data; the XML is stored
//! uncompressed as UTF-16LE with a byte order mark, and can sit at the end of a
//! multi-gigabyte file. Its structure is fixed and small, so a tiny tree parser here reads
//! it, with no XML crate.

pub const MAGIC: &[u8; 8] = b"MSWIM\0\0\0";
/// Pipable WIMs (wimlib's `--pipable`) start with this instead.
pub const PIPABLE_MAGIC: &[u8; 8] = b"WLPWM\0\0\0";
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WimError {
    #[error("it is {size} bytes, shorter than the {HEADER_LEN}-byte WIM header")]
    TooShort { size: u64 },
    #[error("it does not start with the WIM magic \"MSWIM\"")]
    BadMagic,
    #[error("it is a pipable WIM, which install media do not use")]
    Pipable,
    #[error("its header claims {0} bytes, not {HEADER_LEN}")]
    BadHeaderSize(u32),
    #[error("its XML data are marked compressed, which WIMs never do")]
    XmlCompressed,
    #[error("its XML data would be bytes {offset}..{} but the file is {file_size} bytes", offset.saturating_add(*size))]
    XmlOutsideFile { offset: u64, size: u64, file_size: u64 },
    #[error("its XML data claim {size} bytes, implausibly many")]
    XmlTooLarge { size: u64 },
    #[error("its XML data do not start with a UTF-16LE byte order mark")]
    NoByteOrderMark,
    #[error("its XML data: not valid UTF-16")]
    NotUtf16,
    #[error("its XML data: {0}")]
    Xml(#[from] xml::XmlError),
    #[error("its XML data: the root element is <{0}>, not <WIM>")]
    RootNotWim(String),
    #[error("its XML data: an <IMAGE> has no numeric INDEX")]
    NoIndex,
    #[error("its XML data list no image")]
    NoImages,
}

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
    let text = String::from_utf16(&units).map_err(|_| WimError::NotUtf16)?;
    // Some writers end the document with a NUL.
    let root = xml::parse(text.trim_end_matches('\0'))?;
    if root.name != "WIM" {
        return Err(WimError::RootNotWim(root.name));
    }
    let mut images = Vec::new();
    for image in root.children.iter().filter(|c| c.name == "IMAGE") {
        let index = image.attr("INDEX").and_then(|i| i.trim().parse().ok()).ok_or(WimError::NoIndex)?;
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

/// Reads header and XML through `read(offset, len)` from a WIM of `size` bytes: the file
/// itself, or a file inside a disc image.
pub fn read_images<E>(
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

/// Just enough XML for a WIM's XML data: elements, attributes, text, the five predefined
/// entities and character references; comments, processing instructions and declarations
/// are skipped.
pub mod xml {
    #[derive(Debug, Default)]
    pub struct Element {
        pub name: String,
        pub attrs: Vec<(String, String)>,
        pub children: Vec<Element>,
        pub text: String,
    }

    /// Why a document is not XML this parser reads.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum XmlError {
        #[error("an end tag is not closed")]
        EndTagNotClosed,
        #[error("</{0}> closes nothing")]
        ClosesNothing(String),
        #[error("<{open}> is closed by </{close}>")]
        Mismatched { open: String, close: String },
        #[error("a start tag is not closed")]
        StartTagNotClosed,
        #[error("elements are nested too deeply")]
        TooDeep,
        #[error("text outside the root element")]
        TextOutsideRoot,
        #[error("<{0}> is never closed")]
        NeverClosed(String),
        #[error("no root element")]
        NoRoot,
        #[error("a second root element <{0}>")]
        SecondRoot(String),
        #[error("a markup declaration has no \"{0}\"")]
        DeclarationNotClosed(&'static str),
        #[error("a start tag has no name")]
        NoName,
        #[error("<{element}> has an attribute without a value")]
        AttributeWithoutValue { element: String },
        #[error("<{element}>'s attribute {attribute} is not quoted")]
        AttributeNotQuoted { element: String, attribute: String },
        #[error("<{element}>'s attribute {attribute} is not closed")]
        AttributeNotClosed { element: String, attribute: String },
        #[error("an entity reference has no ';'")]
        EntityNotClosed,
        #[error("unknown entity &{0};")]
        UnknownEntity(String),
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

    pub fn parse(doc: &str) -> Result<Element, XmlError> {
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
                    let end = body.find('>').ok_or(XmlError::EndTagNotClosed)?;
                    let name = body[..end].trim();
                    let element = stack.pop().ok_or_else(|| XmlError::ClosesNothing(name.to_owned()))?;
                    if element.name != name {
                        return Err(XmlError::Mismatched { open: element.name, close: name.to_owned() });
                    }
                    rest = &body[end + 1..];
                    attach(&mut stack, &mut root, element)?;
                } else {
                    let end = tag_end(after).ok_or(XmlError::StartTagNotClosed)?;
                    let (tag, self_closing) = match after[..end].strip_suffix('/') {
                        Some(tag) => (tag, true),
                        None => (&after[..end], false),
                    };
                    let element = start_tag(tag)?;
                    rest = &after[end + 1..];
                    if self_closing {
                        attach(&mut stack, &mut root, element)?;
                    } else if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
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
                    None => return Err(XmlError::TextOutsideRoot),
                }
                rest = &rest[end..];
            }
        }
        if let Some(open) = stack.pop() {
            return Err(XmlError::NeverClosed(open.name));
        }
        root.ok_or(XmlError::NoRoot)
    }

    fn attach(stack: &mut [Element], root: &mut Option<Element>, element: Element) -> Result<(), XmlError> {
        match stack.last_mut() {
            Some(parent) => parent.children.push(element),
            None if root.is_none() => *root = Some(element),
            None => return Err(XmlError::SecondRoot(element.name)),
        }
        Ok(())
    }

    fn skip_past<'a>(s: &'a str, end: &'static str) -> Result<&'a str, XmlError> {
        s.find(end).map(|i| &s[i + end.len()..]).ok_or(XmlError::DeclarationNotClosed(end))
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

    fn start_tag(tag: &str) -> Result<Element, XmlError> {
        let tag = tag.trim();
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.is_empty() {
            return Err(XmlError::NoName);
        }
        let mut element = Element { name: name.to_owned(), ..Element::default() };
        let mut rest = tag[name_end..].trim_start();
        while !rest.is_empty() {
            let eq = rest.find('=').ok_or_else(|| XmlError::AttributeWithoutValue { element: name.to_owned() })?;
            let key = rest[..eq].trim().to_owned();
            let value_part = rest[eq + 1..].trim_start();
            let quote = value_part.chars().next().filter(|c| *c == '"' || *c == '\'');
            let Some(quote) = quote else {
                return Err(XmlError::AttributeNotQuoted { element: name.to_owned(), attribute: key });
            };
            let Some(close) = value_part[1..].find(quote) else {
                return Err(XmlError::AttributeNotClosed { element: name.to_owned(), attribute: key });
            };
            element.attrs.push((key, unescape(&value_part[1..1 + close])?));
            rest = value_part[close + 2..].trim_start();
        }
        Ok(element)
    }

    fn unescape(s: &str) -> Result<String, XmlError> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            let after = &rest[amp + 1..];
            let semi = after.find(';').ok_or(XmlError::EntityNotClosed)?;
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
                    code.and_then(char::from_u32).ok_or_else(|| XmlError::UnknownEntity(entity.to_owned()))?
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
            let why = |doc: &str| parse(doc).unwrap_err().to_string();
            assert_eq!(why("<A><B></A>"), "<B> is closed by </A>");
            assert_eq!(why("<A>"), "<A> is never closed");
            assert_eq!(why("<A/><B/>"), "a second root element <B>");
            assert_eq!(why("<A>&nbsp;</A>"), "unknown entity &nbsp;");
            assert_eq!(why("<A x=1/>"), "<A>'s attribute x is not quoted");
            assert_eq!(why(""), "no root element");
            assert_eq!(why("<A><!-- x"), "a markup declaration has no \"-->\"");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::test_util::{temp_path, tool_available};
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The images of a WIM file on disk (wiminfo's view).
    fn images_in_file(path: &Path) -> Vec<WimImage> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).unwrap();
        let size = file.metadata().unwrap().len();
        let read = |offset, len| {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        };
        read_images(size, read, |e| std::io::Error::other(e.to_string())).unwrap()
    }

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
        let images = images_in_file(&wim);
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
}
