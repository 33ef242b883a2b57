//! A master boot record with one primary partition, addressed by LBA only: what a raw disk
//! needs for Windows to mount the file system on it (Windows mounts partitions of fixed
//! disks, not a bare file system).

pub const SECTOR_BYTES: usize = 512;
/// Partition types of FAT file systems addressed by LBA.
pub const TYPE_FAT32_LBA: u8 = 0x0C;
pub const TYPE_FAT16_LBA: u8 = 0x0E;
/// Where the disk signature and the first partition entry are.
pub const SIGNATURE_AT: usize = 440;
pub const FIRST_ENTRY_AT: usize = 446;

/// The boot sector of a disk whose one partition, not active, of `partition_type`, spans
/// `sectors` from `first_lba`. Its code only asks the BIOS to try the next boot device
/// (`int 18h`), like a floppy's boot sector that is not bootable.
pub fn one_partition(disk_signature: u32, partition_type: u8, first_lba: u32, sectors: u32) -> [u8; SECTOR_BYTES] {
    let mut mbr = [0u8; SECTOR_BYTES];
    mbr[..5].copy_from_slice(&[0xCD, 0x18, 0xF4, 0xEB, 0xFD]); // int 18h; hlt; jmp $-1
    mbr[SIGNATURE_AT..SIGNATURE_AT + 4].copy_from_slice(&disk_signature.to_le_bytes());
    let entry = &mut mbr[FIRST_ENTRY_AT..FIRST_ENTRY_AT + 16];
    entry[0] = 0x00; // not active
    entry[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]); // CHS unused: LBA only
    entry[4] = partition_type;
    entry[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    entry[8..12].copy_from_slice(&first_lba.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lba_partition_and_nothing_else() {
        let mbr = one_partition(0x4E57_564D, TYPE_FAT16_LBA, 2048, 65536);
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
        assert_eq!(&mbr[440..444], b"MVWN");
        let entry = &mbr[446..462];
        assert_eq!((entry[0], entry[4]), (0, 0x0E));
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(entry[12..16].try_into().unwrap()), 65536);
        assert!(mbr[462..510].iter().all(|&b| b == 0), "one partition only");
    }
}
