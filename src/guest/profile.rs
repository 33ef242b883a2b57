//! One profile per guest: what differs between the standin and Windows, in one place. The
//! stages ask the profile for the media, the install boot, the boot that is saved and revived,
//! the command that maps the controller's shares, and the shell; they never look at which
//! guest it is.

use super::{standin, windows};
use crate::spec::{GuestSpec, WindowsOptions};
use crate::tools::MissingTool;
use crate::vm::kernel;
use crate::vm::qemu::{KernelBoot, Machine, E1000E, GUEST_MAC, VIRTIO_NET};
use std::path::{Path, PathBuf};

/// What a test node's login prints once it reads commands (see [`Profile::test_node_login`]).
pub const TEST_SHELL_READY: &str = "winvm-test-shell-ready";
/// Windows' firewall rule that lets the test network in.
pub const TEST_FIREWALL_RULE: &str = "nix-winvm-test";

#[derive(Debug, Clone, Copy)]
pub enum Profile<'a> {
    Standin,
    Windows(&'a WindowsOptions),
}

pub fn profile(guest: &GuestSpec) -> Profile<'_> {
    match guest {
        GuestSpec::Standin => Profile::Standin,
        GuestSpec::Windows(options) => Profile::Windows(options),
    }
}

/// What the media stage gives a profile to make its media from.
pub struct MediaInputs<'a> {
    pub out: &'a Path,
    /// The guest kernel's modules (the standin's initramfs carries some).
    pub modules: &'a Path,
    /// The image's public key, the one the controller logs in with.
    pub pubkey: &'a str,
    pub busybox: &'a Path,
    pub dropbear: &'a Path,
    /// Windows: the offline Cygwin repository, if the image names one.
    pub cygwin_repo: Option<&'a Path>,
    pub disk_size_mib: u64,
    /// UEFI: Windows lays its disk out for it.
    pub efi: bool,
}

/// How the install stage runs the installer VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub machine: Machine,
    pub mac: &'static str,
    /// The installer powers off when done (the standin), or reboots on its way (Windows).
    pub no_reboot: bool,
    /// The serial console line that says the install finished.
    pub done_line: &'static str,
    /// What starts the installer's steps on the serial console (the build log shows each).
    pub step_marker: &'static str,
    /// The answer file the installer boots with (Windows), for the install's report.
    pub answer_file: Option<PathBuf>,
    /// Windows: the image of install.wim it installs, and the product key for the answer file.
    pub edition: Option<windows::editions::Selection>,
    /// Keys to press while the installer starts: Windows' CD boot loader under UEFI waits for
    /// one ("Press any key to boot from CD or DVD").
    pub press_keys: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{0}")]
    Standin(#[source] standin::StandinError),
    #[error("{0}")]
    Media(#[source] windows::media::MediaError),
    #[error("{0}")]
    MissingTool(#[source] MissingTool),
    /// Writing a file of the media.
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// The image asks for something the profile cannot do yet.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The edition is not in the ISO's install.wim, or that cannot be read.
    #[error("{0}")]
    Edition(#[source] windows::editions::EditionError),
}

/// The standin's initramfs files in the media.
const STANDIN_INSTALLER: &str = "installer.img";
const STANDIN_BOOT: &str = "boot.img";

impl Profile<'_> {
    /// Writes what the guest installs and boots from into the media; returns the progress line.
    pub fn write_media(self, m: &MediaInputs) -> Result<String, ProfileError> {
        match self {
            Profile::Standin => {
                let write = |img: crate::initramfs::Initramfs, name: &str| {
                    let path = m.out.join(name);
                    img.write_gz_file(&path).map_err(|source| ProfileError::Write { path, source })
                };
                let installer =
                    standin::installer(m.busybox, m.dropbear, m.modules, m.pubkey).map_err(ProfileError::Standin)?;
                write(installer, STANDIN_INSTALLER)?;
                write(standin::boot(m.busybox, m.modules).map_err(ProfileError::Standin)?, STANDIN_BOOT)?;
                Ok("media ready: kernel, installer, boot initramfs, key pair".into())
            }
            Profile::Windows(options) => {
                let tools = windows::media::MediaTools::find().map_err(ProfileError::MissingTool)?;
                let summary = windows::media::build_media(
                    options,
                    m.efi,
                    m.disk_size_mib,
                    m.pubkey,
                    m.cygwin_repo,
                    m.out,
                    &tools,
                )
                .map_err(ProfileError::Media)?;
                Ok(format!(
                    "windows media ready: autounattend.xml for '{}', cygwin.img ({})",
                    options.edition,
                    if summary.cygwin_packages_present {
                        "with Cygwin packages"
                    } else {
                        "WITHOUT Cygwin packages: see README.txt"
                    }
                ))
            }
        }
    }

    /// Whether the install stage needs the installation ISO (`$iso`).
    pub fn needs_iso(self) -> bool {
        matches!(self, Profile::Windows(_))
    }

    /// The installer VM: from the media onto the blank `disk`. `iso` is there when
    /// [`Profile::needs_iso`].
    ///
    /// `efi`: the image boots UEFI firmware (the caller attaches it). `work`: where the
    /// install stage keeps what it writes for this boot (Windows: the answer medium).
    pub fn install(
        self,
        media: &Path,
        disk: &Path,
        iso: Option<&Path>,
        efi: bool,
        work: &Path,
    ) -> Result<Install, ProfileError> {
        match self {
            Profile::Standin => Ok(Install {
                machine: Machine {
                    boot: Some(linux_boot(media, STANDIN_INSTALLER)),
                    disk: Some(disk.to_path_buf()),
                    nic_model: VIRTIO_NET,
                    extra_args: vec![],
                    hyperv: false,
                    display: true,
                    uefi: None,
                },
                mac: "",
                no_reboot: true,
                done_line: standin::INSTALL_DONE,
                step_marker: standin::INSTALL_STEP,
                answer_file: None,
                edition: None,
                press_keys: false,
            }),
            Profile::Windows(options) => {
                // Media without Cygwin packages are refused with the way to add them.
                windows::media::ensure_ready_for_install(media).map_err(ProfileError::Media)?;
                let iso = iso.ok_or(ProfileError::Unsupported("the Windows install needs the installation ISO"))?;
                // Before anything boots: an edition Setup would not find fails here, in a
                // second, with the names the ISO has.
                let edition = windows::editions::check_iso(iso, options).map_err(ProfileError::Edition)?;
                let answer =
                    windows::media::write_answer_medium(options, efi, &edition, work).map_err(ProfileError::Media)?;
                let extra_args = windows::media::install_drive_args(media, &answer, iso, disk);
                // Setup reboots several times; the bootstrap powers off at the very end. The
                // card is there, in the slot of the later stages, for the static address to
                // bind to.
                Ok(Install {
                    machine: windows_machine(extra_args),
                    mac: GUEST_MAC,
                    no_reboot: false,
                    done_line: windows::scripts::INSTALL_OK_LINE,
                    step_marker: windows::INSTALL_MARKER_PREFIX,
                    answer_file: Some(work.join(windows::media::AUTOUNATTEND_XML)),
                    edition: Some(edition),
                    press_keys: efi,
                })
            }
        }
    }

    /// The installed guest on `disk`, as the suspend stage boots it and every build revives
    /// it: identical in both, as migration requires.
    ///
    /// `outputs_disk`: an empty raw file of [`OUTPUTS_DISK_BYTES`], the guest's outputs disk
    /// (see [`Profile::with_local_outputs`]); a new one for every session, as a saved guest
    /// has the devices it was saved with.
    pub fn machine(self, media: &Path, disk: PathBuf, outputs_disk: &Path) -> Machine {
        let outputs = |device: &str| {
            vec![
                "-drive".into(),
                format!(
                    "if=none,id=winvm-outputs,format=raw,cache=writeback,{},file={}",
                    crate::vm::qemu::DISK_ERRORS,
                    crate::vm::qemu::option_path(outputs_disk)
                )
                .into(),
                "-device".into(),
                format!("{device},drive=winvm-outputs").into(),
            ]
        };
        match self {
            Profile::Standin => Machine {
                boot: Some(linux_boot(media, STANDIN_BOOT)),
                disk: Some(disk),
                nic_model: VIRTIO_NET,
                // On a PCI slot after the system disk's (the board's devices fill the first
                // slots), so that Linux finds it second: /dev/vdb.
                extra_args: outputs("virtio-blk-pci,addr=0x1c"),
                hyperv: false,
                display: true,
                uefi: None,
            },
            Profile::Windows(_) => {
                let mut args = windows::media::system_disk_args(&disk);
                // The second AHCI disk: PhysicalDrive1, Cygwin's /dev/sdb.
                args.extend(outputs("ide-hd,bus=ide.4"));
                windows_machine(args)
            }
        }
    }

    /// The guest's name for its outputs disk: the second disk, raw, never partitioned.
    pub fn outputs_device(self) -> &'static str {
        match self {
            Profile::Standin => "/dev/vdb",
            Profile::Windows(_) => "/dev/sdb",
        }
    }

    /// The command the controller runs in the guest before the pair is saved: the shares
    /// mapped once (proving they work), an SMB session to the controller left open on its
    /// session share, and no tree of the store or exchange shares (each build's controller
    /// mounts new folders there).
    pub fn prepare_command(self) -> String {
        match self {
            Profile::Standin => standin::prepare_command(),
            // Cygwin mounts of the UNC paths and their fstab lines, the session share held by
            // this logon (the SSH connection the controller keeps for the builds).
            Profile::Windows(_) => windows::scripts::map_shares_sh(),
        }
    }

    /// The shell a build's script runs in: Cygwin's bash, or the standin's busybox sh.
    pub fn shell(self) -> &'static str {
        match self {
            Profile::Standin => "/bin/sh",
            Profile::Windows(_) => "/bin/bash",
        }
    }

    /// A layer's command: the `count` commands the builder wrote into the exchange folder
    /// ([`LAYER_DIR`]`/1` ...), each run in turn as a script of its own in the guest's shell
    /// with `-e` (as a build's script is), stdin at its end; the first that fails ends the
    /// layer with its exit code, its number left in [`LAYER_FAILED`] ("N CODE"). Then the
    /// guest's own check that the layer left it as a build expects, and its caches dropped
    /// (a smaller state; nothing cached of the share outlives the session).
    pub fn layer_command(self, count: usize) -> String {
        let shell = self.shell();
        let finish = match self {
            Profile::Standin => standin::layer_finish(),
            Profile::Windows(_) => windows::outputs::layer_finish(),
        };
        format!(
            r#"{GUEST_SAY}winvm_n={count}
winvm_i=1
while [ "$winvm_i" -le "$winvm_n" ]; do
    winvm_say "layer command $winvm_i of $winvm_n"
    (cd /tmp && exec {shell} -e "/tmp/xchg/{LAYER_DIR}/$winvm_i") </dev/null
    winvm_code=$?
    if [ "$winvm_code" != 0 ]; then
        echo "$winvm_i $winvm_code" >"/tmp/xchg/{LAYER_FAILED}"
        echo "nix-winvm: layer command $winvm_i of $winvm_n exited $winvm_code" >&2
        exit "$winvm_code"
    fi
    winvm_i=$((winvm_i + 1))
done
{finish}winvm_say "layer commands done"
"#
        )
    }

    /// A re-run's command (`run-vm`, `shell`): in `/tmp`, the build's environment sourced when
    /// the re-run has it (`env`), the outputs (store names) made on the guest's own disk under
    /// their store paths, then `command`, or a login shell (`None`) that says where the build's
    /// script is (`script`). `inputs`: the store names the build's sandbox held, which the
    /// standin binds alone over its store outside the sandbox (the share is then the whole
    /// host store: thousands of paths, each a mount over SMB).
    pub fn rerun_command(
        self,
        outputs: &[String],
        inputs: &[String],
        env: bool,
        script: bool,
        command: Option<&[String]>,
    ) -> String {
        let mut c = String::from("cd /tmp\n");
        if env {
            c.push_str(". /tmp/xchg/saved-env\n");
        }
        if !outputs.is_empty() {
            let redirect = match self {
                Profile::Standin if !inputs.is_empty() => {
                    c.push_str(&format!("winvm_inputs={}\n", crate::shell::quote(&inputs.join(" "))));
                    standin::REDIRECT_OUTPUTS_LISTED
                }
                Profile::Standin => standin::REDIRECT_OUTPUTS,
                Profile::Windows(_) => windows::outputs::REDIRECT_OUTPUTS,
            };
            c.push_str(&format!("winvm_outputs={}\n{redirect}", crate::shell::quote(&outputs.join(" "))));
            c.push_str(
                "winvm_redirect || echo \"nix-winvm: the outputs could not be placed on the guest's disk\" >&2\n",
            );
        }
        match command {
            Some(args) => {
                c.push_str("exec");
                for arg in args {
                    c.push(' ');
                    c.push_str(&crate::shell::quote(arg));
                }
            }
            None => {
                let sh = self.shell();
                c.push_str("echo \"nix-winvm: a shell in the guest, in /tmp");
                c.push_str(if env { ", with the build's environment" } else { "" });
                c.push_str("; exit (or Ctrl-D) stops the VMs\"\n");
                if script {
                    c.push_str(&format!("echo \"nix-winvm: the build's script: {sh} -e /tmp/xchg/script\"\n"));
                }
                c.push_str(&format!("PS1='winvm:$PWD$ '; export PS1\nexec {sh} -i"));
            }
        }
        c
    }

    /// A test node's login (`windowsTest`): the node's address on the test network
    /// (`address`/24, beside the session's own on the same adapter: a revived machine keeps
    /// the devices it was saved with), its host name, every node's name in the hosts file,
    /// then the pty made raw and silent (the driver speaks a protocol, not a terminal), the
    /// marker the driver waits for, and a shell reading commands from the driver: as a script
    /// (`/proc/self/fd/0` on the standin, whose /dev has no `stdin`; `/dev/stdin` in Cygwin),
    /// since a shell whose stdin is a terminal is interactive (a prompt, and line editing that
    /// echoes and limits a line's length).
    pub fn test_node_login(self, name: &str, address: &str, hosts: &[(String, String)]) -> String {
        use crate::shell::quote;
        let entries: String = hosts.iter().map(|(addr, host)| format!("{addr} {host}\\n")).collect();
        let ready = format!("stty raw -echo\necho {TEST_SHELL_READY}\n");
        match self {
            Profile::Standin => format!(
                "cd /tmp\nip addr add {address}/24 dev eth0\nhostname {name}\n\
                 printf '127.0.0.1 localhost\\n{entries}' > /etc/hosts\n{ready}exec /bin/sh /proc/self/fd/0\n",
                name = quote(name),
            ),
            // Read in Microsoft's documentation, never run: `netsh interface ipv4 add address`
            // adds an address to an adapter that has a static one; the hosts file is Windows'
            // (Cygwin's /etc/hosts links to it); the computer's own name changes only with a
            // restart, which a revived node cannot take, so the node's name is only the hosts
            // file's. The firewall lets the test network in.
            Profile::Windows(_) => format!(
                "cd /tmp\nsys=$(cygpath -S)\n\
                 \"$sys/netsh.exe\" interface ipv4 add address name={nic} {address} 255.255.255.0 >/dev/null\n\
                 \"$sys/netsh.exe\" advfirewall firewall add rule name={rule} dir=in action=allow \
                 remoteip={net}.0/24 >/dev/null\n\
                 printf '{entries}' | sed 's/$/\\r/' >> \"$(cygpath -W)/System32/drivers/etc/hosts\"\n\
                 export HOSTNAME={name}\n{ready}exec /bin/bash /dev/stdin\n",
                nic = windows::FIRST_NIC_ALIAS,
                rule = TEST_FIREWALL_RULE,
                net = crate::spec::TEST_NET_PREFIX,
                name = quote(name),
            ),
        }
    }

    /// `build` (the command that runs the build) wrapped so that the outputs, named by their
    /// store names, are made on the guest's own disk and come back as one tar archive written
    /// onto the guest's outputs disk ([`Profile::outputs_device`]), which the builder unpacks
    /// once the VMs are stopped: through the SMB share, symbolic links and exec bits would not
    /// survive, and a disk is many times faster. The archive is made only after a build that succeeded (Nix
    /// discards a failed build's outputs anyway), and holds the outputs the build made: one it
    /// did not make stays absent, and Nix says so. The exit code is the build's, or 1 with a
    /// line that says why when the outputs could not be placed or packed.
    pub fn with_local_outputs(self, build: &str, outputs: &[String]) -> String {
        let (redirect, pack) = match self {
            Profile::Standin => (standin::REDIRECT_OUTPUTS, standin::PACK_OUTPUTS),
            Profile::Windows(_) => (windows::outputs::REDIRECT_OUTPUTS, windows::outputs::PACK_OUTPUTS),
        };
        let store = crate::spec::STORE_DIR;
        let names = crate::shell::quote(&outputs.join(" "));
        let device = self.outputs_device();
        format!(
            r#"winvm_outputs={names}
{GUEST_SAY}{redirect}{pack}winvm_redirect || {{ echo "nix-winvm: the outputs could not be placed on the guest's disk" >&2; exit 1; }}
({build})
winvm_code=$?
if [ "$winvm_code" = 0 ]; then
    set --
    for winvm_n in $winvm_outputs; do
        if [ -e "{store}/$winvm_n" ] || [ -L "{store}/$winvm_n" ]; then set -- "$@" "$winvm_n"; fi
    done
    if [ $# -gt 0 ]; then
        winvm_say "packing $# of the outputs"
        winvm_pack "$@" || {{
            echo "nix-winvm: packing the outputs onto the outputs disk {device} failed" >&2
            exit 1
        }}
        winvm_say "outputs packed"
    fi
fi
exit "$winvm_code"
"#
        )
    }
}

/// `winvm_say`, for the commands the builder runs in the guest: a progress line in the build
/// log, with the guest's uptime (Cygwin has /proc/uptime too).
const GUEST_SAY: &str =
    "winvm_say() { read -r winvm_up winvm_idle </proc/uptime; echo \"nix-winvm: [guest $winvm_up s] $*\"; }\n";

pub use super::{LAYER_DIR, LAYER_FAILED};

/// The size of the guest's outputs disk, the same in every session (a revived guest keeps the
/// size it saw when it was saved): a sparse file, so only what the guest writes takes room.
pub const OUTPUTS_DISK_BYTES: u64 = 1 << 40;

/// Windows in every stage: booted by the firmware from the disks in `extra_args`, e1000e,
/// Hyper-V enlightenments under KVM, a display.
fn windows_machine(extra_args: Vec<std::ffi::OsString>) -> Machine {
    Machine { boot: None, disk: None, nic_model: E1000E, extra_args, hyperv: true, display: true, uefi: None }
}

/// The standin boots with a screen, as Windows does (see [`kernel::with_display`]).
fn linux_boot(media: &Path, initrd: &str) -> KernelBoot {
    KernelBoot {
        kernel: kernel::with_display(media),
        initrd: media.join(initrd),
        append: kernel::APPEND_DISPLAY.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_runs_each_command_file_in_the_guests_shell_then_its_finish() {
        let standin = Profile::Standin.layer_command(3);
        assert!(standin.contains("winvm_n=3\n"), "{standin}");
        assert!(standin.contains(r#"(cd /tmp && exec /bin/sh -e "/tmp/xchg/layer/$winvm_i") </dev/null"#), "{standin}");
        assert!(standin.contains(r#"echo "$winvm_i $winvm_code" >"/tmp/xchg/layer-failed""#), "{standin}");
        let (ran, finish) = (standin.find("done\n").unwrap(), standin.find("ls -A /var/winvm/store").unwrap());
        assert!(ran < finish && standin.contains("echo 3 >/proc/sys/vm/drop_caches"), "{standin}");
        let guest = GuestSpec::Windows(WindowsOptions::new("Windows 11 Pro"));
        let windows = profile(&guest).layer_command(1);
        assert!(windows.contains(r#"exec /bin/bash -e "/tmp/xchg/layer/$winvm_i""#), "{windows}");
        assert!(windows.contains("done\nsync\n") && !windows.contains("/var/winvm"), "{windows}");
    }

    #[test]
    fn the_standin_installs_from_its_installer_and_boots_its_disk() {
        let media = Path::new("/m");
        let install = Profile::Standin.install(media, Path::new("/d.qcow2"), None, false, Path::new("/w")).unwrap();
        assert_eq!(install.machine.boot.as_ref().unwrap().initrd, Path::new("/m/installer.img"));
        assert_eq!(install.machine.disk.as_deref(), Some(Path::new("/d.qcow2")));
        assert!(install.no_reboot);
        let boot = Profile::Standin.machine(media, "/o.qcow2".into(), Path::new("/w/outputs.img"));
        assert_eq!(boot.boot.unwrap().initrd, Path::new("/m/boot.img"));
        let args: Vec<String> = boot.extra_args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "-drive",
                "if=none,id=winvm-outputs,format=raw,cache=writeback,werror=report,rerror=report,file=/w/outputs.img",
                "-device",
                "virtio-blk-pci,addr=0x1c,drive=winvm-outputs",
            ]
        );
        assert_eq!(Profile::Standin.outputs_device(), "/dev/vdb");
        assert_eq!(Profile::Standin.shell(), "/bin/sh");
        assert!(!Profile::Standin.needs_iso());
    }

    #[test]
    fn windows_boots_its_system_disk_from_the_firmware_with_a_display() {
        let guest = GuestSpec::Windows(WindowsOptions::new("Windows 11 Pro"));
        let profile = profile(&guest);
        let m = profile.machine(Path::new("/m"), "/d,x.qcow2".into(), Path::new("/w/outputs.img"));
        assert_eq!(m.boot, None);
        assert_eq!(m.nic_model, E1000E);
        assert!(m.hyperv, "Windows gets the Hyper-V enlightenments under KVM");
        let args: Vec<String> = m.extra_args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "-drive",
                "if=none,id=winvm-system,file=/d,,x.qcow2,format=qcow2,cache=writeback,discard=unmap,detect-zeroes=unmap,werror=report,rerror=report",
                "-device",
                "ide-hd,drive=winvm-system,bus=ide.0,bootindex=0",
                "-drive",
                "if=none,id=winvm-outputs,format=raw,cache=writeback,werror=report,rerror=report,file=/w/outputs.img",
                "-device",
                "ide-hd,bus=ide.4,drive=winvm-outputs",
            ]
        );
        assert_eq!(profile.outputs_device(), "/dev/sdb");
        assert!(m.display, "Windows expects a display adapter; its screen is taken");
        assert_eq!(profile.shell(), "/bin/bash");
        assert!(profile.needs_iso());
    }
}
