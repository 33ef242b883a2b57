//! `README.txt` of the media: the summary for people, led by a warning when the Cygwin
//! packages are missing, since that is the one thing that makes the media unusable. Kept
//! apart so the wording can change without touching how the media are built.

use super::{names, MediaSummary, CYGWIN_LABEL};

pub(super) fn readme_text(summary: &MediaSummary) -> String {
    let mut text = String::new();
    if !summary.cygwin_packages_present {
        text.push_str(
            "!! THE CYGWIN PACKAGES ARE MISSING. The install stage refuses these media.\n\
             !! No cygwinRepo was given to builtins.windowsImage, so cygwin.img holds the scripts\n\
             !! but not Cygwin's setup program nor its packages. Build a local package directory\n\
             !! from a pinned setup.ini with nix/cygwin.nix and pass it as `cygwinRepo = ...;`\n\
             !! (docs/WINDOWS.md shows how).\n\n",
        );
    }
    text.push_str(&format!(
        "nix-winvm install media for \"{edition}\" ({boot}, locale {locale}).\n\n\
         autounattend.xml  the answer file Windows Setup follows\n\
         answer.img        a 1.44 MB FAT12 floppy holding only autounattend.xml; Setup finds it\n\
         \x20                 on its own at the root of removable media\n\
         cygwin.img        a raw disk (MBR, one {fs} partition at 1 MiB, label {label}) holding\n\
         \x20                 {marker}, install.cmd, bootstrap.sh, map-shares.sh{repo}\n\
         install.cmd       run at the first logon: installs Cygwin offline, runs bootstrap.sh\n\
         bootstrap.sh      configures sshd, the authorized key, the network, then powers off\n\
         map-shares.sh     run over SSH at the suspend stage: maps the controller's Samba shares\n\
         media.json        this summary as JSON\n\n\
         Cygwin packages requested: {requested} (plus the Base category)\n",
        edition = summary.edition,
        boot = if summary.efi { "UEFI, GPT" } else { "BIOS, MBR" },
        locale = summary.locale,
        fs = summary.cygwin_filesystem,
        label = CYGWIN_LABEL,
        marker = names::MARKER,
        repo = if summary.cygwin_packages_present {
            ",\n                  setup-x86_64.exe and cygwin-packages/"
        } else {
            ""
        },
        requested = summary.requested_packages.join(" "),
    ));
    if summary.cygwin_packages_present {
        text.push_str(&format!(
            "Cygwin packages on cygwin.img ({} with dependencies, {} bytes of archives, {}): {}\n",
            summary.cygwin_closure.len(),
            summary.cygwin_archive_bytes,
            if summary.cygwin_hashes_checked { "sizes and SHA-512 checked" } else { "sizes checked" },
            summary.cygwin_closure.join(" "),
        ));
    }
    text.push_str("\nInspect the images with mtools: mdir -i answer.img ::   mdir -i cygwin.img@@1M -/ ::\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::windows::media::MEDIA_FORMAT;

    fn summary(present: bool) -> MediaSummary {
        MediaSummary {
            format: MEDIA_FORMAT,
            edition: "Windows 10 Pro".into(),
            efi: false,
            locale: "en-US".into(),
            product_key_given: false,
            hardware_check_bypass: false,
            install_commands: 0,
            requested_packages: vec!["cygrunsrv".into(), "make".into(), "openssh".into()],
            cygwin_packages_present: present,
            cygwin_closure: if present { vec!["make".into(), "openssh".into()] } else { Vec::new() },
            cygwin_archive_bytes: if present { 1234 } else { 0 },
            cygwin_hashes_checked: present,
            cygwin_image_bytes: 34 << 20,
            cygwin_filesystem: "FAT16".into(),
            files: Vec::new(),
        }
    }

    #[test]
    fn the_warning_leads_only_when_the_packages_are_missing() {
        let missing = readme_text(&summary(false));
        assert!(missing.starts_with("!! THE CYGWIN PACKAGES ARE MISSING"), "{missing}");
        assert!(!missing.contains("Cygwin packages on cygwin.img"), "{missing}");
        let present = readme_text(&summary(true));
        assert!(present.starts_with("nix-winvm install media for \"Windows 10 Pro\" (BIOS, MBR, locale en-US)."));
        assert!(present.contains("setup-x86_64.exe and cygwin-packages/"), "{present}");
        assert!(
            present.contains("(2 with dependencies, 1234 bytes of archives, sizes and SHA-512 checked): make openssh"),
            "{present}"
        );
        assert!(present.contains("\nmedia.json        this summary as JSON\n"), "{present}");
    }
}
