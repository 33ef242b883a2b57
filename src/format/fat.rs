//! FAT boot sectors, as far as a disk mtools formatted needs reading: which of FAT16 and FAT32
//! the volume is, for the partition type of the disk's MBR ([`super::mbr`]).

/// FAT16 or FAT32, as a boot sector's extended BIOS parameter block names its file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatKind {
    Fat16,
    Fat32,
}

impl FatKind {
    pub fn name(self) -> &'static str {
        match self {
            FatKind::Fat16 => "FAT16",
            FatKind::Fat32 => "FAT32",
        }
    }
}

/// Which of FAT16 and FAT32 the boot sector of a volume holds (the type names at their
/// fields of the two extended BPB layouts), if either.
pub fn kind(boot_sector: &[u8]) -> Option<FatKind> {
    if boot_sector.get(82..87) == Some(b"FAT32") {
        Some(FatKind::Fat32)
    } else if boot_sector.get(54..59) == Some(b"FAT16") {
        Some(FatKind::Fat16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_read_where_each_layout_names_it() {
        let mut sector = [0u8; 512];
        assert_eq!(kind(&sector), None);
        sector[54..62].copy_from_slice(b"FAT12   ");
        assert_eq!(kind(&sector), None, "a FAT12 floppy is neither");
        sector[54..62].copy_from_slice(b"FAT16   ");
        assert_eq!(kind(&sector), Some(FatKind::Fat16));
        assert_eq!(kind(&sector[..60]), Some(FatKind::Fat16));
        sector[82..90].copy_from_slice(b"FAT32   ");
        assert_eq!(kind(&sector).map(FatKind::name), Some("FAT32"));
        assert_eq!(kind(&sector[..20]), None);
    }
}
