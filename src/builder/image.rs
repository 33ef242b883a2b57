//! The image, as every stage that revives one sees it: its files (`meta.json`, the disk, the two
//! state files, the key, the UEFI variables, the media's controller files), its metadata and its
//! format, the checks made before any VM starts, the overlay a session writes to, and the two
//! machines a revive boots. The build stage, layers, pinning and re-runs use it; none of them
//! keeps a copy.

use super::Progress;
use super::{io, BuilderError};
use crate::guest;
use crate::guest::windows::editions::{InstallRecord, INSTALL_RECORD};
use crate::session::{ControllerBoot, GuestBoot, SessionConfig, Task};
use crate::spec::{Accel, ImageSpec, MachineShape};
use crate::tools::{Ovmf, Tools};
use crate::vm::memory::{self, GuestRam};
use crate::vm::qemu::{Machine, Uefi};
use crate::vm::{accel, kernel, state};
use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(super) fn accel_for(spec: &ImageSpec, progress: &Progress) -> Result<Accel, BuilderError> {
    let a = accel::choose(spec.shape.accel)?;
    progress.say(&format!("accelerator: {}", a.name()));
    Ok(a)
}

/// In the media: the controller's system disk.
pub const CONTROLLER_SYSTEM: &str = "controller-system.img";

/// In the media: the controller's initramfs; in the image: the controller saved while it
/// waits for its session.
pub const CONTROLLER_IMG: &str = "controller.img";

pub const CONTROLLER_STATE: &str = "controller-state";
/// A pinned image's media folder, relative to the image (meta.json names it so; see `pin`).
pub const PINNED_MEDIA: &str = "media";
/// The controller's system disk in a pinned image's media: a compressed qcow2.
pub const PINNED_CONTROLLER_SYSTEM: &str = "controller-system.qcow2";

/// UEFI images: the firmware's variable store (boot entries), made at the install from OVMF's
/// template, saved with the image at the suspend, copied for each build.
pub const EFI_VARS: &str = "efi-vars.fd";

/// UEFI (`efi = true`): OVMF, with the image's variable store at `vars`, a writable copy of
/// `from` (OVMF's template at the install; the previous stage's store after). BIOS: None.
pub(super) fn uefi(spec: &ImageSpec, from: Option<&Path>, vars: &Path) -> Result<Option<Uefi>, BuilderError> {
    if !spec.shape.efi {
        return Ok(None);
    }
    let ovmf = Ovmf::find()?;
    let from = from.unwrap_or(&ovmf.vars_template);
    std::fs::copy(from, vars).map_err(io(format!("copying {} to {}", from.display(), vars.display())))?;
    // Store files are read-only; the firmware writes its variables.
    std::fs::set_permissions(vars, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io(format!("making {} writable", vars.display())))?;
    Ok(Some(Uefi { code: ovmf.code, vars: vars.to_path_buf() }))
}

pub(super) fn qemu_img(
    tools: &Tools,
    args: &[&str],
    paths: &[&std::ffi::OsStr],
    size: &str,
) -> Result<(), BuilderError> {
    let qemu_img = tools.qemu.with_file_name("qemu-img");
    let qemu_img = if qemu_img.exists() { qemu_img } else { crate::tools::find("qemu-img")? };
    let mut c = Command::new(&qemu_img);
    c.args(args).args(paths);
    if !size.is_empty() {
        c.arg(size);
    }
    let o = c.output().map_err(io(format!("running {}", qemu_img.display())))?;
    if !o.status.success() {
        return Err(BuilderError::Tool {
            tool: "qemu-img".into(),
            detail: format!("{}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()),
        });
    }
    Ok(())
}

/// The parts of an image a build needs, before any VM starts: its key, and a disk that
/// `qemu-img check` finds whole (a few milliseconds; a damaged overlay would otherwise fail
/// inside the guest, as I/O errors).
pub(super) fn check_image(tools: &Tools, image: &Path) -> Result<(), BuilderError> {
    let key = image.join("key");
    if let Err(source) = std::fs::File::open(&key) {
        return Err(BuilderError::ImageDamaged {
            image: image.to_path_buf(),
            what: format!("has no key: {}: {source}", key.display()),
        });
    }
    let disk = image.join("disk.qcow2");
    let qemu_img = tools.qemu.with_file_name("qemu-img");
    let qemu_img = if qemu_img.exists() { qemu_img } else { crate::tools::find("qemu-img")? };
    let o = Command::new(&qemu_img)
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&disk)
        .output()
        .map_err(io(format!("running {}", qemu_img.display())))?;
    // 0: clean; 3: leaked clusters only, harmless; anything else: corrupt or unreadable.
    if !matches!(o.status.code(), Some(0) | Some(3)) {
        let said =
            format!("{} {}", String::from_utf8_lossy(&o.stderr).trim(), String::from_utf8_lossy(&o.stdout).trim());
        return Err(BuilderError::DiskDamaged { disk, detail: said.trim().to_owned() });
    }
    Ok(())
}

/// An overlay on `backing`, which stays untouched.
pub(super) fn overlay(tools: &Tools, backing: &Path, path: &Path) -> Result<(), BuilderError> {
    qemu_img(
        tools,
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing.display().to_string()],
        &[path.as_os_str()],
        "",
    )
}

/// What to do about an image of another format than [`IMAGE_FORMAT`] or [`STREAM_IMAGE_FORMAT`].
fn image_format_advice(format: u64) -> String {
    if format < u64::from(STREAM_IMAGE_FORMAT) {
        format!(
            "it has image format {format}, from an older nix-winvm that did not record the QEMU machine type its memory was saved as, so no QEMU but the one that made it could revive it safely; this nix-winvm revives format {IMAGE_FORMAT}: build the image again (a pinned image: take the pin off, build it, and pin the new hash)"
        )
    } else {
        format!(
            "it has image format {format}, from a newer nix-winvm; this one revives formats {STREAM_IMAGE_FORMAT} and {IMAGE_FORMAT}: use the nix-winvm that made it, or a newer one"
        )
    }
}

/// The image layout this builder makes and revives (`meta.json`'s `format`):
/// 1 (no `format` field): before the machine type was recorded; refused, with what to do.
/// 2: `machine`, the QEMU machine type both VMs were saved as, given again at every revive;
///    both VMs have the VM Generation ID device (a revive reseeds their random numbers).
///    The guest's RAM is in its state file: still revived (pinned images of that time).
/// 3: the guest's RAM is in the memory file `memory` (see `vm::memory`): an image made from
///    media lists its pages, a layer those that differ from its base's; builds map it.
pub const IMAGE_FORMAT: u32 = 3;
/// The format whose guest state holds its RAM (see [`IMAGE_FORMAT`]).
pub const STREAM_IMAGE_FORMAT: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageMeta {
    pub format: u32,
    pub spec: ImageSpec,
    pub state_format: u32,
    /// QEMU's versioned machine type (`pc-q35-10.0`) the pair was saved as.
    pub machine: String,
    pub media: PathBuf,
    /// How many layers are under this image's own (0: made from the media).
    #[serde(default)]
    pub layers: u32,
    /// A layer's base image.
    #[serde(default)]
    pub base: Option<PathBuf>,
}

impl ImageMeta {
    /// The metadata of `image`, of this builder's [`IMAGE_FORMAT`] (checked first, before
    /// the fields that format has).
    pub fn load(image: &Path) -> Result<ImageMeta, BuilderError> {
        let path = image.join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        let not_meta = || io(format!("{} is not a nix-winvm image's metadata", path.display()));
        let value: serde_json::Value = serde_json::from_str(&text).map_err(not_meta())?;
        let format = match value.get("format") {
            None => 1,
            Some(f) => f.as_u64().ok_or_else(|| BuilderError::ImageFormat {
                image: image.to_path_buf(),
                detail: format!("its format is {f}, not a number"),
            })?,
        };
        if format != u64::from(IMAGE_FORMAT) && format != u64::from(STREAM_IMAGE_FORMAT) {
            return Err(BuilderError::ImageFormat { image: image.to_path_buf(), detail: image_format_advice(format) });
        }
        let mut meta: ImageMeta = serde_json::from_value(value).map_err(not_meta())?;
        // A pinned image holds its media (see `pin`).
        if meta.media.is_relative() {
            meta.media = image.join(&meta.media);
        }
        Ok(meta)
    }

    /// Whether the guest's RAM is in a memory file of its own (not in its state).
    pub fn ram_outside(&self) -> bool {
        self.format >= IMAGE_FORMAT
    }

    /// The shape the pair was saved as: the spec's, of the recorded machine type.
    pub fn shape(&self) -> MachineShape {
        self.spec.shape.with_machine_type(&self.machine)
    }

    /// The metadata of `image`, which must have been made from `spec`.
    pub fn read(image: &Path, spec: &ImageSpec) -> Result<ImageMeta, BuilderError> {
        let meta = ImageMeta::load(image)?;
        if &meta.spec != spec {
            return Err(BuilderError::ImageMismatch {
                image: image.to_path_buf(),
                differs: crate::spec::differences(&meta.spec, spec),
                pinned: is_pinned(image),
            });
        }
        Ok(meta)
    }

    pub(super) fn write(&self, out: &Path) -> Result<(), BuilderError> {
        let json = serde_json::to_string_pretty(self).map_err(io("meta.json"))?;
        std::fs::write(out.join("meta.json"), json).map_err(io("writing meta.json"))
    }
}

/// An image checked before any VM revives it (see [`revivable`]).
pub(super) struct Revivable {
    pub path: PathBuf,
    pub meta: ImageMeta,
    /// The shape its pair revives as: the image's, under the accelerator chosen here.
    pub shape: MachineShape,
    pub tools: Tools,
}

/// The image `image` checked before any VM revives it (a build, a layer on it, a pin, a
/// re-run): its metadata (made from `spec`, where the caller has one), its two state files and
/// its disk; the evaluation media's expiry said. With the shape and the tools to revive it.
pub(super) fn revivable(
    image: &Path,
    spec: Option<&ImageSpec>,
    progress: &Progress,
) -> Result<Revivable, BuilderError> {
    let meta = match spec {
        Some(spec) => ImageMeta::read(image, spec)?,
        None => ImageMeta::load(image)?,
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(warning) = InstallRecord::of_image(image).and_then(|record| record.expiry_warning(now)) {
        progress.say(&warning);
    }
    inspect_states(image, &meta)?;
    let shape = MachineShape { accel: accel_for(&meta.spec, progress)?, ..meta.shape() };
    let tools = Tools::find()?;
    check_image(&tools, image)?;
    Ok(Revivable { path: image.to_path_buf(), meta, shape, tools })
}

/// Where a revived guest's memory comes from (an image of format 3): the RAM file of the image
/// at the bottom of its chain, and the memory files of the layers above it, bottom first.
pub(super) struct Memory {
    pub ram: PathBuf,
    pub layers: Vec<PathBuf>,
    pub memory_mib: u32,
}

/// The environment variable (a derivation attribute) naming the memory stage's output of an
/// image's chain: the RAM file the build maps (see `stages::memory`).
pub const MEMORY_VAR: &str = "winvmMemory";
/// The environment variable of a layer and of its memory stage naming its base's memory stage.
pub const BASE_MEMORY_VAR: &str = "baseMemory";

/// The file of a memory stage's output naming the image whose memory its RAM file holds.
pub const MEMORY_UPTO: &str = "upto";

/// A memory stage's output, read for the image `image`: its RAM file, and the images of
/// `image`'s chain above the one whose memory that file holds, bottom first (their pages are
/// written over it).
pub(super) struct MemoryStage {
    pub ram: PathBuf,
    pub upto: PathBuf,
    pub above: Vec<PathBuf>,
}

impl MemoryStage {
    pub(super) fn read(stage: &Path, image: &Path) -> Result<MemoryStage, BuilderError> {
        let ram = stage.join(memory::RAM_FILE);
        let missing = |what: String| BuilderError::ImageDamaged { image: image.to_path_buf(), what };
        if !ram.is_file() {
            return Err(missing(format!("has no expanded memory at {} ({MEMORY_VAR})", ram.display())));
        }
        let chain = chain(image)?;
        // A stage of an image made from media may lack `upto`: it holds the bottom's.
        let upto = match std::fs::read(stage.join(MEMORY_UPTO)) {
            Ok(bytes) => PathBuf::from(std::ffi::OsString::from_vec(bytes)),
            Err(_) => chain[0].clone(),
        };
        let Some(at) = chain.iter().position(|i| *i == upto) else {
            return Err(missing(format!(
                "is not above {}, whose memory its memory stage {} holds",
                upto.display(),
                stage.display()
            )));
        };
        Ok(MemoryStage { ram, upto, above: chain[at + 1..].to_vec() })
    }
}

/// The images of `image`'s chain, from the one made from media (or pinned) up to `image`.
pub(super) fn chain(image: &Path) -> Result<Vec<PathBuf>, BuilderError> {
    let mut chain = vec![image.to_path_buf()];
    loop {
        let meta = ImageMeta::load(chain.last().expect("not empty"))?;
        match meta.base {
            Some(base) if chain.len() < 1000 => chain.push(base),
            _ => break,
        }
    }
    chain.reverse();
    Ok(chain)
}

impl Revivable {
    /// Where this image's guest memory comes from (None: it is in the state, format 2): the RAM
    /// file the memory stage expanded into `named` (`winvmMemory`), or, when there is none (a direct
    /// `shell` of an image, an image value made without the plugin's `memory`), one expanded
    /// into `work` now, which takes time in proportion to the memory used.
    pub(super) fn memory(
        &self,
        named: Option<PathBuf>,
        work: &Path,
        progress: &Progress,
    ) -> Result<Option<Memory>, BuilderError> {
        if !self.meta.ram_outside() {
            return Ok(None);
        }
        let chain = chain(&self.path)?;
        let memory_mib = self.meta.spec.shape.memory_mib;
        let (ram, above) = match named {
            Some(named) => {
                let stage = MemoryStage::read(&named, &self.path)?;
                (stage.ram, stage.above)
            }
            None => {
                let ram = work.join(memory::RAM_FILE).with_extension("base");
                progress.say("expanding the image's memory into the work folder (no memory path given)");
                memory::expand(&chain[0].join(memory::MEMORY_FILE), memory_mib, &ram).map_err(damaged(&chain[0]))?;
                (ram, chain[1..].to_vec())
            }
        };
        let layers = above.iter().map(|i| i.join(memory::MEMORY_FILE)).collect();
        Ok(Some(Memory { ram, layers, memory_mib }))
    }

    /// The session of this image's pair, revived: the guest on the overlay `disk` (of the
    /// image's disk, or a layer's own), its UEFI variable store copied into `work`; the
    /// controller saved while it waited for its session. Its RAM mapped from `memory`'s file,
    /// the layers' pages written over it.
    pub(super) fn session(
        &self,
        disk: PathBuf,
        work: &Path,
        task: Task,
        memory: Option<&Memory>,
    ) -> Result<SessionConfig, BuilderError> {
        let (image, meta) = (&self.path, &self.meta);
        let (ram, ram_layers) = match memory {
            Some(m) => (GuestRam::Private(m.ram.clone()), m.layers.clone()),
            None => (GuestRam::Anonymous, vec![]),
        };
        let guest = GuestBoot {
            ram,
            ram_layers,
            machine: Machine {
                uefi: uefi(&meta.spec, Some(&image.join(EFI_VARS)), &work.join(EFI_VARS))?,
                ..guest::profile(&meta.spec.guest).machine(&meta.media, disk, &outputs_disk(work)?)
            },
            revive_from: Some(image.join("state")),
            key: image.join("key"),
        };
        let controller =
            ControllerBoot { revive_from: Some(image.join(CONTROLLER_STATE)), ..media_controller(&meta.media) };
        let mut cfg =
            SessionConfig::new(self.shape.clone(), guest, controller, task, work.to_path_buf(), self.tools.clone())?;
        cfg.pinned_image = is_pinned(image);
        Ok(cfg)
    }
}

/// A new image's output begun: its disk, an overlay on the disk in `from` (the installed
/// stage, or a layer's base), with the image's key, the install's record from `from` (its
/// date; an evaluation's end), where each build looks for it, and a link to the media. The
/// disk's path.
pub(super) fn new_image(
    tools: &Tools,
    out: &Path,
    from: &Path,
    key: &Path,
    media: &Path,
) -> Result<PathBuf, BuilderError> {
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    let disk = out.join("disk.qcow2");
    overlay(tools, &from.join("disk.qcow2"), &disk)?;
    std::fs::copy(key, out.join("key")).map_err(io("copying the key"))?;
    let record = from.join(INSTALL_RECORD);
    if record.is_file() {
        std::fs::copy(&record, out.join(INSTALL_RECORD)).map_err(io(format!("copying {}", record.display())))?;
    }
    std::os::unix::fs::symlink(media, out.join("media")).map_err(io("linking the media"))?;
    Ok(disk)
}

/// An image's memory file and two state files (`meta`: its metadata, already read), refused
/// before any VM starts if they are not files of this version or are cut short; their
/// checksums are checked in the one pass that streams each into QEMU. Their reading from disk starts now, while the switch and the QEMUs start
/// (when they are not in the page cache, it is most of a revive's time).
pub(super) fn inspect_states(image: &Path, meta: &ImageMeta) -> Result<(), BuilderError> {
    if meta.ram_outside() {
        let layer = meta.base.is_some();
        memory::inspect(&image.join(memory::MEMORY_FILE), meta.spec.shape.memory_mib, layer).map_err(damaged(image))?;
    }
    for f in [image.join("state"), image.join(CONTROLLER_STATE)] {
        // Missing, foreign, cut short: the image is damaged, and is built again.
        state::inspect(&f, None).map_err(|e| BuilderError::ImageDamaged {
            image: image.to_path_buf(),
            what: format!("has a damaged state file: {e}"),
        })?;
        if let Ok(file) = std::fs::File::open(&f) {
            crate::vm::sys::os::read_ahead(&file);
        }
    }
    Ok(())
}

/// A damaged memory file of `image`: the image is built again.
pub(super) fn damaged(image: &Path) -> impl FnOnce(memory::MemoryError) -> BuilderError + '_ {
    move |e| BuilderError::ImageDamaged { image: image.to_path_buf(), what: format!("has a damaged memory file: {e}") }
}

/// The controller of the media (an image's, or the stage's input): its kernel, its initramfs
/// and its system disk, booted.
pub(super) fn media_controller(media: &Path) -> ControllerBoot {
    // A pinned image's media hold the system disk as a compressed qcow2 (see `pin`).
    let pinned = media.join(PINNED_CONTROLLER_SYSTEM);
    ControllerBoot {
        kernel: kernel::bootable(media),
        modules: media.join("modules"),
        initrd: Some(media.join(CONTROLLER_IMG)),
        system: Some(if pinned.is_file() { pinned } else { media.join(CONTROLLER_SYSTEM) }),
        revive_from: None,
    }
}

/// The guest's outputs disk in a session's work folder.
pub const OUTPUTS_DISK: &str = "outputs.img";

/// A new, empty outputs disk in `work` (sparse: it takes no room until the guest writes).
pub(super) fn outputs_disk(work: &Path) -> Result<PathBuf, BuilderError> {
    let path = work.join(OUTPUTS_DISK);
    let file = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
    file.set_len(guest::profile::OUTPUTS_DISK_BYTES).map_err(io(format!("sizing {}", path.display())))?;
    Ok(path)
}

/// Whether `image` is a pinned one: it holds its media (see `pin`).
pub(super) fn is_pinned(image: &Path) -> bool {
    image.join(PINNED_MEDIA).join(PINNED_CONTROLLER_SYSTEM).is_file()
}

/// The machine type `tools`' QEMU makes new images as (see `qemu::machine_type`).
pub(super) fn machine_type(tools: &Tools) -> Result<String, BuilderError> {
    Ok(crate::vm::qemu::machine_type(&tools.qemu)?)
}
