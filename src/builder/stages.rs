//! The image stages and the build, as Nix runs them: each reads its inputs from the
//! environment (`$media`, `$installed`, `$image`, ...) and writes `$out`.
//!
//!   media   -> vmlinuz, modules/, installer.img, boot.img, key, key.pub
//!   install -> disk.qcow2 (the installed base disk)
//!   suspend -> disk.qcow2 (overlay on the base), state, key, media -> (link), meta.json
//!   build   -> whatever the guest writes to $out through the share

use super::image::{
    accel_for, damaged, machine_type, media_controller, new_image, outputs_disk, overlay, qemu_img, revivable, uefi,
    ImageMeta, BASE_MEMORY_VAR, CONTROLLER_IMG, CONTROLLER_STATE, CONTROLLER_SYSTEM, EFI_VARS, IMAGE_FORMAT,
    MEMORY_VAR, OUTPUTS_DISK, STREAM_IMAGE_FORMAT,
};
use super::report;
use super::Progress;
use super::{env_path, io, runtime, BuilderError};
use crate::guest::windows::editions::{InstallRecord, INSTALL_RECORD};
use crate::guest::{self, MediaInputs};

use crate::session::{self, After, GuestBoot, SessionConfig, Task, TestFault, SCREENS_DIR};
use crate::shell;
use crate::spec::{self, BuildSpec, ImageSpec, LayerSpec, MachineShape};
use crate::tools::Tools;
use crate::vm::console::MarkedLines;
use crate::vm::memory::{self, GuestRam};
use crate::vm::process::{describe_status, ProcessGuard};
use crate::vm::qemu::{Machine, VmConfig};
use crate::vm::screen::{self, Screens};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub fn generate_key(ssh_keygen: &Path, path: &Path) -> Result<String, BuilderError> {
    let status = Command::new(ssh_keygen)
        .args(["-q", "-t", "ecdsa", "-b", "256", "-N", "", "-m", "PEM", "-C", "nix-winvm", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .map_err(io(format!("running {}", ssh_keygen.display())))?;
    if !status.success() {
        return Err(BuilderError::Tool {
            tool: "ssh-keygen".into(),
            detail: format!("failed with {}", describe_status(status)),
        });
    }
    std::fs::read_to_string(path.with_extension("pub")).map_err(io("reading the public key"))
}

fn write_initrd(img: &crate::initramfs::Initramfs, path: &Path) -> Result<(), BuilderError> {
    img.write_gz_file(path).map_err(io(format!("writing {}", path.display())))
}

/// The stage's working folder: serial logs, QMP sockets, the `run-vm` script. It is left in
/// the build folder, which Nix removes after the build unless it was asked to keep it
/// (`nix-build -K`), so a failed build can be examined and its VMs started again.
fn work_dir() -> Result<PathBuf, BuilderError> {
    let dir = tempfile::Builder::new().prefix("winvm").tempdir().map_err(io("creating a work directory"))?;
    Ok(dir.keep())
}

/// Stage 1: everything the VMs boot from, and the image's own key pair.
pub fn media(spec: &ImageSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let kernel = env_path("kernel")?;
    let tools = Tools::find()?;
    std::fs::create_dir_all(out.join("modules")).map_err(io(format!("creating {}", out.display())))?;
    // The controller is Linux whatever the guest is: every image carries its kernel.
    std::fs::copy(kernel.join("vmlinuz"), out.join("vmlinuz")).map_err(io("copying the kernel"))?;
    for entry in std::fs::read_dir(kernel.join("modules")).map_err(io("reading the kernel modules"))? {
        let entry = entry.map_err(io("reading the kernel modules"))?;
        std::fs::copy(entry.path(), out.join("modules").join(entry.file_name())).map_err(io("copying a module"))?;
    }
    match super::extract_vmlinux(&out.join("vmlinuz"), &out.join("vmlinux")) {
        Ok(()) => progress.say("uncompressed kernel ready (PVH boot)"),
        Err(e) => progress.say(&format!("{e}; the VMs boot the compressed kernel, seconds slower")),
    }
    // A key per image: the VM has no network beyond the controller, and the key opens only it.
    let pubkey = generate_key(&tools.ssh_keygen, &out.join("key"))?;
    let modules = out.join("modules");
    // The controller's initramfs and system disk are the same for every session: made once,
    // saved with the image, ready to serve.
    let controller = crate::controller::initramfs(&tools.busybox, &modules, true)?;
    write_initrd(&controller, &out.join(CONTROLLER_IMG))?;
    controller_system(spec, &tools, &out)?;
    progress.say("controller system disk ready");
    let cygwin_repo = std::env::var_os("cygwinRepo").map(PathBuf::from);
    let line = guest::profile(&spec.guest).write_media(&MediaInputs {
        out: &out,
        modules: &modules,
        pubkey: &pubkey,
        busybox: &tools.busybox,
        dropbear: &tools.dropbear,
        cygwin_repo: cygwin_repo.as_deref(),
        disk_size_mib: spec.disk_size_mib,
        efi: spec.shape.efi,
    })?;
    progress.say(&line);
    report::save_stage(&out, "media", progress, None, None)?;
    Ok(0)
}

/// The controller's system disk (see `controller::system`): smbd, the agent (this program)
/// and their libraries from the tools closure the derivation names, the image's key, and what
/// the agent does before the pair is saved.
fn controller_system(spec: &ImageSpec, tools: &Tools, out: &Path) -> Result<(), BuilderError> {
    use crate::controller::system;
    use crate::protocol::{self, ReadyConfig, ServeConfig, Share};
    let agent = std::env::current_exe().map_err(io("finding this program"))?;
    let lib = std::env::var_os("winvmToolsLib").map(PathBuf::from);
    let tools_dir = std::env::var_os("winvmTools").map(PathBuf::from).ok_or(BuilderError::MissingEnv("winvmTools"))?;
    let (store_paths, smbd) = controller_store_paths(lib, &tools_dir, &tools.smbd, &agent)?;
    let config = ReadyConfig {
        serve: ServeConfig {
            shares: vec![
                Share { name: "nixstore".into(), path: protocol::READY_STORE.into() },
                Share { name: "xchg".into(), path: protocol::READY_XCHG.into() },
                Share { name: protocol::SESSION_SHARE.into(), path: protocol::READY_SHARE_DIR.into() },
            ],
            run_dir: protocol::READY_SAMBA_DIR.into(),
            smbd,
            smbd_log: "/run/smbd.log".into(),
            guest_addr: format!("{}:22", crate::guest::GUEST_IP),
            user: crate::guest::SSH_USER.into(),
            key_file: protocol::READY_KEY.into(),
            ssh_timeout_secs: spec.timeout_secs.max(1),
        },
        prepare: guest::profile(&spec.guest).prepare_command(),
    };
    let staging = work_dir()?;
    let inputs = system::SystemInputs {
        store_paths: &store_paths,
        agent: &agent,
        key: &out.join("key"),
        config: &config,
        mke2fs: &crate::tools::find("mke2fs")?,
        staging: &staging,
    };
    system::write(&inputs, &out.join(CONTROLLER_SYSTEM))
        .map_err(|e| BuilderError::Tool { tool: "mke2fs".into(), detail: e.to_string() })
}

/// In nixpkgs' tools (nix/package.nix): the closure of smbd and the builder, as `closureInfo`
/// writes it (`store-paths`, one store path a line).
const CONTROLLER_CLOSURE: &str = "share/nix-winvm/controller-closure/store-paths";

/// What the controller's system disk holds, and the smbd it runs. Debian's closure
/// (scripts/tools-closure) names its library folder, `winvmToolsLib`: that folder, smbd and the
/// agent. nixpkgs' programs load their libraries from their own store paths: the tools carry
/// the whole closure of smbd and the builder, and smbd is the program behind the tools' link.
pub(crate) fn controller_store_paths(
    lib: Option<PathBuf>,
    tools_dir: &Path,
    smbd: &Path,
    agent: &Path,
) -> Result<(Vec<PathBuf>, PathBuf), BuilderError> {
    if let Some(lib) = lib {
        return Ok((vec![lib, smbd.to_path_buf(), agent.to_path_buf()], smbd.to_path_buf()));
    }
    let list = tools_dir.join(CONTROLLER_CLOSURE);
    let text = std::fs::read_to_string(&list).map_err(|e| BuilderError::Tool {
        tool: "the controller's closure".into(),
        detail: format!(
            "the derivation names no winvmToolsLib, and {} cannot be read ({e}): the tools closure is neither scripts/tools-closure's nor nix/package.nix's",
            list.display()
        ),
    })?;
    let smbd = std::fs::canonicalize(smbd).map_err(io(format!("resolving {}", smbd.display())))?;
    let paths: Vec<PathBuf> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    for needed in [&smbd, &agent.to_path_buf()] {
        if !paths.iter().any(|p| needed.starts_with(p)) {
            return Err(BuilderError::Tool {
                tool: "the controller's closure".into(),
                detail: format!("{} lists no store path holding {}", list.display(), needed.display()),
            });
        }
    }
    Ok((paths, smbd))
}

/// How long the install stage keeps pressing Enter for a boot loader that waits for a key
/// (Windows' CD under UEFI): OVMF alone takes about 15 s to get there under TCG.
const KEY_PRESS_WINDOW: Duration = Duration::from_secs(90);

/// Stage 2: boot the installer with a blank disk; it installs and powers off.
pub fn install(spec: &ImageSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let media = env_path("media")?;
    let tools = Tools::find()?;
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    let disk = out.join("disk.qcow2");
    let work = work_dir()?;
    let serial = work.join("install-serial.log");
    let profile = guest::profile(&spec.guest);
    let iso = if profile.needs_iso() { Some(env_path("iso")?) } else { None };
    let mut install = profile.install(&media, &disk, iso.as_deref(), spec.shape.efi, &work)?;
    install.machine.uefi = uefi(spec, None, &out.join(EFI_VARS))?;
    if let Some(selection) = &install.edition {
        progress.say(&selection.describe());
    }
    qemu_img(&tools, &["create", "-q", "-f", "qcow2"], &[disk.as_os_str()], &format!("{}M", spec.disk_size_mib))?;
    let shape =
        MachineShape { accel: accel_for(spec, progress)?, ..spec.shape.with_machine_type(&machine_type(&tools)?) };
    let vm = VmConfig {
        name: "installer".into(),
        shape,
        boot: install.machine.boot,
        nic_model: install.machine.nic_model,
        extra_args: install.machine.extra_args,
        no_reboot: install.no_reboot,
        serial_log: serial.clone(),
        vde_ctl: None,
        mac: install.mac.into(),
        qmp: None,
        exports: vec![],
        disk: install.machine.disk,
        ram: crate::vm::memory::GuestRam::Anonymous,
        incoming: None,
        hyperv: install.machine.hyperv,
        screen: install.machine.display.then(|| work.join("installer-screen.sock")),
        uefi: install.machine.uefi,
    };
    let timeline = report::timeline_dir(&work);
    let mut screens =
        vm.screen.as_ref().map(|sock| Screens::new("installer", work.join(SCREENS_DIR), sock).with_timeline(&timeline));
    if let (Some(screens), true) = (screens.as_mut(), install.press_keys) {
        screens.press_keys_for(KEY_PRESS_WINDOW);
    }
    let timeout = Duration::from_secs(spec.timeout_secs);
    let mut steps = MarkedLines::new(&serial, install.step_marker);
    let rt = runtime()?;
    let status = rt.block_on(async {
        let mut cmd = tokio::process::Command::new(&tools.qemu);
        cmd.args(crate::vm::qemu::firmware_args(&tools.qemu))
            .args(vm.args())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .stdout(Stdio::null());
        let mut guard = ProcessGuard::spawn("installer", cmd)?;
        progress.say("installer VM started");
        // A Windows install takes hours: Nix going away (a signal, or its log pipe closed when it
        // was killed) stops the installer at once; the guard kills and reaps it.
        let mut nix = session::NixWatch::new()?;
        let ended = {
            let wait = guard.wait();
            tokio::pin!(wait);
            let follow = follow_steps(&mut steps, progress);
            tokio::pin!(follow);
            let say = |line: &str| progress.say(line);
            tokio::select! {
                ended = tokio::time::timeout(timeout, screen::during(screens.as_mut(), wait, &say)) => ended,
                stopped = nix.stopped() => return Err(stopped.into()),
                never = &mut follow => match never {},
            }
        };
        // The lines the installer wrote since the last look.
        say_steps(&mut steps, progress);
        match ended {
            Ok(s) => Ok(s),
            Err(_) => {
                // Still running: its screen tells where it stopped.
                if let Some(screens) = screens.as_mut() {
                    screens.capture().await;
                }
                Err(BuilderError::InstallTimeout {
                    secs: timeout.as_secs(),
                    screen: screens.as_ref().and_then(Screens::describe),
                })
            }
        }
    })?;
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    if !log.contains(install.done_line) {
        return Err(BuilderError::InstallUnfinished {
            status: describe_status(status),
            log_tail: crate::vm::tail_lines(&serial, crate::vm::LOG_TAIL_LINES),
            screen: screens.as_ref().and_then(Screens::describe),
        });
    }
    progress.say("installed");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let record = InstallRecord::new(now, install.edition.map(|selection| selection.edition));
    let json = serde_json::to_string_pretty(&record).map_err(io(INSTALL_RECORD))?;
    std::fs::write(out.join(INSTALL_RECORD), json).map_err(io(format!("writing {INSTALL_RECORD}")))?;
    report::save_stage(&out, "install", progress, install.answer_file.as_deref(), Some(&timeline))?;
    Ok(0)
}

/// How often the install stage reads the installer's serial log for its steps.
const STEP_POLL: Duration = Duration::from_secs(1);

/// Says each step the installer writes on its serial console, as it comes, until dropped.
async fn follow_steps(steps: &mut MarkedLines, progress: &Progress) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(STEP_POLL).await;
        say_steps(steps, progress);
    }
}

/// The installer's new steps: each a line of the log, and Nix's phase.
fn say_steps(steps: &mut MarkedLines, progress: &Progress) {
    for step in steps.poll() {
        progress.phase(&format!("install: {step}"));
        progress.say(&format!("installer: {step}"));
    }
}

/// The guest's RAM file `ram`, after its save, kept in `out` as the image's memory file: its
/// pages that are not zero, or those that differ from `base` (a layer's).
fn save_memory(
    ram: &Path,
    memory_mib: u32,
    base: Option<&Path>,
    out: &Path,
    progress: &Progress,
) -> Result<(), BuilderError> {
    let to = out.join(memory::MEMORY_FILE);
    let header = memory::save(ram, memory_mib, base, &to).map_err(|e| BuilderError::Io {
        what: format!("saving the guest's memory into {}", to.display()),
        source: Box::new(e),
    })?;
    let size = std::fs::metadata(&to).map_or(0, |m| m.len());
    progress.say(&format!(
        "memory saved: {} pages ({:.1} MB) {}, {:.1} MB compressed",
        header.pages,
        header.pages as f64 * memory::PAGE as f64 / 1e6,
        if base.is_some() { "differ from the base's" } else { "are not zero" },
        size as f64 / 1e6
    ));
    Ok(())
}

/// A layer's memory stage links to its base's RAM file, and leaves its pages (and those of
/// the layers below it that the base's stage did not put in) to each revive, while they are
/// at most this many bytes; above, it puts the base's RAM file and them together in a RAM file
/// of its own, so that no revive writes more than this into its guest.
pub const LINKED_LAYER_BYTES: u64 = 64 << 20;

/// The memory stage: an image's RAM file, for builds to map, made where they run (a derivation
/// that is not substituted: a copy of the image carries the compressed memory alone). An image
/// made from media (or pinned): its memory file expanded into `$out/ram`, sparse. A layer
/// (`baseMemory`: its base's memory stage): `ram` links to the base's RAM file, or is the base's
/// and the layers' pages put together (see [`LINKED_LAYER_BYTES`]); `upto` names the image
/// whose memory it holds. An image of format 2 has its RAM in its state: the output is empty.
pub fn memory_stage(progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let image = env_path("image")?;
    let meta = ImageMeta::load(&image)?;
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    if !meta.ram_outside() {
        progress.say(&format!("{} keeps its memory in its state: nothing to expand", image.display()));
        return Ok(0);
    }
    let mib = meta.spec.shape.memory_mib;
    let started = std::time::Instant::now();
    let ram = out.join(memory::RAM_FILE);
    let (upto, pages) = match std::env::var_os(BASE_MEMORY_VAR) {
        None => {
            // The bottom's memory, and any layers' above it (a layer whose base names no memory
            // stage) put together.
            let chain = super::image::chain(&image)?;
            let layers: Vec<PathBuf> = chain[1..].iter().map(|i| i.join(memory::MEMORY_FILE)).collect();
            let bottom = if layers.is_empty() { ram.clone() } else { out.join("bottom") };
            let mut pages =
                memory::expand(&chain[0].join(memory::MEMORY_FILE), mib, &bottom).map_err(damaged(&chain[0]))?;
            if !layers.is_empty() {
                pages = memory::compose(&bottom, &layers, mib, &ram).map_err(damaged(&image))?;
                std::fs::remove_file(&bottom).map_err(io(format!("removing {}", bottom.display())))?;
            }
            (image.clone(), pages)
        }
        Some(base) => {
            let base = super::image::MemoryStage::read(&PathBuf::from(base), &image)?;
            let layers: Vec<PathBuf> = base.above.iter().map(|i| i.join(memory::MEMORY_FILE)).collect();
            let pages = memory::pages_in(&layers, mib).map_err(damaged(&image))?;
            if pages * memory::PAGE as u64 <= LINKED_LAYER_BYTES {
                let to = std::fs::canonicalize(&base.ram).map_err(io(format!("reading {}", base.ram.display())))?;
                std::os::unix::fs::symlink(&to, &ram).map_err(io("linking the base's RAM file"))?;
                progress.say(&format!(
                    "memory: the base's RAM file, linked; each revive writes the {pages} pages ({:.1} MB) of {} layers over it",
                    pages as f64 * memory::PAGE as f64 / 1e6,
                    layers.len()
                ));
                (base.upto.clone(), 0)
            } else {
                let pages = memory::compose(&base.ram, &layers, mib, &ram).map_err(damaged(&image))?;
                (image.clone(), pages)
            }
        }
    };
    std::fs::write(out.join(super::image::MEMORY_UPTO), upto.as_os_str().as_bytes())
        .map_err(io("writing the memory stage's upto"))?;
    if pages > 0 {
        progress.say(&format!(
            "memory expanded: {pages} pages ({:.1} MB) of {mib} MiB, in {:.2} s",
            pages as f64 * memory::PAGE as f64 / 1e6,
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(0)
}

/// Where an image's pair is saved, in its output.
fn save_to(spec: &ImageSpec, out: &Path) -> session::SaveTo {
    session::SaveTo {
        guest_state: out.join("state"),
        guest: spec.guest.name().into(),
        controller_state: out.join(CONTROLLER_STATE),
    }
}

/// Stage 3: boot the installed disk under an overlay, map the shares, save the memory.
pub fn suspend(spec: &ImageSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let media = env_path("media")?;
    let installed = env_path("installed")?;
    let accel = accel_for(spec, progress)?;
    let tools = Tools::find()?;
    let disk = new_image(&tools, &out, &installed, &media.join("key"), &media)?;
    let work = work_dir()?;
    let profile = guest::profile(&spec.guest);
    // Booted to be saved: the versioned machine type this QEMU makes, which every revive asks for.
    let shape = MachineShape { accel, ..spec.shape.with_machine_type(&machine_type(&tools)?) };
    // The guest's RAM in a file of the work folder, which the save leaves out of its state
    // and the image then keeps as its memory file.
    let ram = work.join(memory::RAM_FILE);
    let guest = GuestBoot {
        machine: Machine {
            uefi: uefi(spec, Some(&installed.join(EFI_VARS)), &out.join(EFI_VARS))?,
            ..profile.machine(&media, disk, &outputs_disk(&work)?)
        },
        revive_from: None,
        ram: GuestRam::Shared(ram.clone()),
        ram_layers: vec![],
        key: media.join("key"),
    };
    let task = Task {
        command: String::new(),
        after: After::SavePair(save_to(spec, &out)),
        timeout: Duration::from_secs(spec.timeout_secs),
        limit: session::Limit::Image,
    };
    let mut cfg = SessionConfig::new(shape, guest, media_controller(&media), task, work, tools)?;
    cfg.timeline = Some(report::timeline_dir(&cfg.work));
    // Saving the pair has no command: it succeeds or fails as a session (a guest whose
    // prepare command failed is `RunError::ControllerNotReady`).
    runtime()?.block_on(session::run(&cfg, progress))?;
    save_memory(&ram, spec.shape.memory_mib, None, &out, progress)?;
    let _ = std::fs::remove_file(&ram);
    ImageMeta {
        format: IMAGE_FORMAT,
        spec: spec.clone(),
        state_format: crate::format::state::FORMAT_VERSION,
        machine: cfg.shape.machine_type.clone(),
        media: media.clone(),
        layers: 0,
        base: None,
    }
    .write(&out)?;
    let mut records: Vec<report::StageRecord> = Vec::new();
    records.extend(report::bring_stage(&media, &out, "media")?);
    records.extend(report::bring_stage(&installed, &out, "install")?);
    records.push(report::save_stage(&out, "suspend", progress, None, cfg.timeline.as_deref())?);
    let heading = report::PageHeading { what: format!("an image of the {} guest", spec.guest.name()), base: None };
    report::write_page(&out, &heading, &records)?;
    Ok(0)
}

/// A layer: the base image revived on a new overlay of its disk, the layer's commands run in
/// the guest (the store shared read-only, as in a build), and the pair, ready to serve again,
/// saved as a new image: `disk.qcow2` (only what the commands changed), both state files, and
/// the base's key, media and install record.
pub fn layer(spec: &LayerSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let base = env_path("image")?;
    let base = revivable(&base, Some(&spec.image), progress)?;
    let meta = &base.meta;
    progress.say(&format!("layer {} on {}: {} commands", meta.layers + 1, base.path.display(), spec.commands));
    let disk = new_image(&base.tools, &out, &base.path, &base.path.join("key"), &meta.media)?;
    let work = work_dir()?;
    let commands = work.join("xchg").join(guest::profile::LAYER_DIR);
    std::fs::create_dir_all(&commands).map_err(io(format!("creating {}", commands.display())))?;
    for i in 0..spec.commands {
        let name = spec::layer_command_attr(i);
        let text =
            std::env::var_os(&name).ok_or_else(|| BuilderError::Usage(format!("the layer's {name} is not set")))?;
        std::fs::write(commands.join((i + 1).to_string()), text.into_vec())
            .map_err(io(format!("writing the layer's command {}", i + 1)))?;
    }
    let task = Task {
        command: guest::profile(&spec.image.guest).layer_command(spec.commands),
        after: After::SaveLayer(save_to(&spec.image, &out)),
        timeout: Duration::from_secs(spec.timeout_secs),
        limit: session::Limit::Layer,
    };
    // The layer's guest runs on a copy of its base's memory, shared, which it saves as the
    // pages that differ from the base's.
    let memory = base.memory(std::env::var_os(BASE_MEMORY_VAR).map(PathBuf::from), &work, progress)?;
    let mut cfg = base.session(disk, &work, task, None)?;
    let below = match &memory {
        Some(m) => {
            // The base's memory put together, kept to tell what the layer changed; the guest
            // runs on a copy of it.
            let (below, ram) = (work.join("ram-below"), work.join(memory::RAM_FILE));
            let together = |e| BuilderError::Io {
                what: "putting the base's memory together for the layer".into(),
                source: Box::new(e),
            };
            memory::compose(&m.ram, &m.layers, m.memory_mib, &below).map_err(together)?;
            memory::compose(&below, &[], m.memory_mib, &ram).map_err(together)?;
            cfg.guest.ram = GuestRam::Shared(ram);
            Some((m.memory_mib, below))
        }
        None => None,
    };
    cfg.timeline = Some(report::timeline_dir(&work));
    let result = runtime()?.block_on(session::run(&cfg, progress));
    if let Ok(crate::protocol::Verdict::Exited(code)) = &result {
        if *code != 0 {
            let failed =
                std::fs::read_to_string(work.join("xchg").join(guest::profile::LAYER_FAILED)).unwrap_or_default();
            return Err(layer_failure(&failed, *code, |i| std::env::var(spec::layer_command_attr(i)).ok()));
        }
    }
    let code = super::finish(result, progress, &[&work, &out])?;
    if spec.image.shape.efi {
        let vars = work.join(EFI_VARS);
        std::fs::copy(&vars, out.join(EFI_VARS)).map_err(io(format!("copying {}", vars.display())))?;
    }
    let layers = meta.layers + 1;
    if let Some((mib, below)) = &below {
        save_memory(&work.join(memory::RAM_FILE), *mib, Some(below), &out, progress)?;
    }
    ImageMeta {
        format: if below.is_some() { IMAGE_FORMAT } else { STREAM_IMAGE_FORMAT },
        spec: spec.image.clone(),
        state_format: crate::format::state::FORMAT_VERSION,
        machine: meta.machine.clone(),
        media: meta.media.clone(),
        layers,
        base: Some(base.path.clone()),
    }
    .write(&out)?;
    // What the overlay takes on disk: the clusters the guest discarded are holes in it.
    let size = std::fs::metadata(out.join("disk.qcow2")).map(|m| m.blocks() * 512).unwrap_or(0);
    progress.say(&format!("layer saved: its disk holds {:.1} MB of changes", size as f64 / 1e6));
    let record = report::save_stage(&out, "layer", progress, None, cfg.timeline.as_deref())?;
    let heading = report::PageHeading {
        what: format!("layer {layers} of an image of the {} guest", spec.image.guest.name()),
        base: Some(&base.path),
    };
    report::write_page(&out, &heading, &[record])?;
    Ok(code)
}

/// Why a layer failed, from the guest's note ("N CODE" for its command N, "check CODE" for
/// the check after them) and the commands (by index from 0).
pub fn layer_failure(note: &str, code: i32, command: impl Fn(usize) -> Option<String>) -> BuilderError {
    let mut words = note.split_whitespace();
    let (what, noted) = (words.next(), words.next().and_then(|c| c.parse::<i32>().ok()));
    if what == Some("check") {
        return BuilderError::LayerCheck;
    }
    match (what.and_then(|n| n.parse::<usize>().ok()).filter(|n| *n >= 1), noted) {
        (Some(index), Some(code)) => {
            BuilderError::LayerCommand { index, code, command: command(index - 1).unwrap_or_default() }
        }
        _ => BuilderError::LayerCommand { index: 0, code, command: String::new() },
    }
}

/// Variables that describe the host's build, not the build itself.
const HOST_ONLY_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "TEMPDIR",
    "TMP",
    "TEMP",
    "NIX_BUILD_TOP",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "TERM",
    "NIX_LOG_FD",
    "_",
    "SHELL",
    "script",
    "winvmBuildSpec",
    "builder",
];

/// The derivation's environment as a script the guest sources (the historic xchg/saved-env).
/// Values are bytes: a Nix string, and so an environment variable, may hold any.
pub fn saved_env(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<u8> {
    let mut lines: Vec<(String, Vec<u8>)> = vars
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| !HOST_ONLY_VARS.contains(&k.as_str()))
        .filter(|(k, _)| {
            k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(k, v)| (k, shell::quote_bytes(v.as_bytes())))
        .collect();
    lines.sort();
    let mut out = Vec::new();
    for (k, v) in lines {
        out.extend_from_slice(format!("export {k}=").as_bytes());
        out.extend_from_slice(&v);
        out.push(b'\n');
    }
    out.extend_from_slice(b"export TMPDIR=/tmp\n");
    out
}

/// The command the guest runs: the environment restored, then the script (or, for
/// runInWindowsVM, the original builder with its arguments). With `outputs`, the guest makes
/// them on its own disk and packs them onto its outputs disk (see
/// [`guest::Profile::with_local_outputs`]).
pub fn guest_command(spec: &BuildSpec, argc: usize, outputs: &[PathBuf]) -> String {
    let profile = guest::profile(&spec.image.guest);
    let mut c = String::from("cd /tmp && . /tmp/xchg/saved-env && ");
    if spec.run_original_builder {
        c.push_str("exec \"$winvmOrigBuilder\"");
        for i in 0..argc {
            c.push_str(&format!(" \"$winvmArg{i}\""));
        }
    } else {
        c.push_str(&format!("exec {} -e /tmp/xchg/script", profile.shell()));
    }
    let names: Vec<String> =
        outputs.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    if names.is_empty() {
        return c;
    }
    profile.with_local_outputs(&c, &names)
}

/// The derivation's output paths: `$outputs` names them ("out" when it is unset), and each
/// name is a variable holding its path.
pub fn output_paths(var: impl Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let names = var("outputs").map_or_else(|| "out".to_owned(), |o| o.to_string_lossy().into_owned());
    names.split_whitespace().filter_map(|name| var(name).map(PathBuf::from)).collect()
}

/// Stage 4: revive the image on a throw-away overlay and run the build.
pub fn build(spec: &BuildSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let image = revivable(&env_path("image")?, Some(&spec.image), progress)?;
    let work = work_dir()?;
    let disk = work.join("disk.qcow2");
    overlay(&image.tools, &image.path.join("disk.qcow2"), &disk)?;
    let xchg = work.join("xchg");
    std::fs::create_dir_all(&xchg).map_err(io("creating the exchange directory"))?;
    std::fs::write(xchg.join("saved-env"), saved_env(std::env::vars_os())).map_err(io("writing saved-env"))?;
    if !spec.run_original_builder {
        let script = std::env::var_os("script").ok_or(BuilderError::MissingEnv("script"))?.into_vec();
        std::fs::write(xchg.join("script"), script).map_err(io("writing the script"))?;
    }
    let argc = std::env::var("winvmArgc").ok().and_then(|a| a.parse().ok()).unwrap_or(0);
    let outputs = output_paths(|name| std::env::var_os(name));
    let task = Task {
        command: guest_command(spec, argc, &outputs),
        after: After::Quit,
        timeout: Duration::from_secs(spec.timeout_secs),
        limit: if spec.run_original_builder { session::Limit::RunInVm } else { session::Limit::Build },
    };
    let named = std::env::var_os(MEMORY_VAR).map(PathBuf::from);
    let memory = image.memory(named.clone(), &work, progress)?;
    let mut cfg = image.session(disk, &work, task, memory.as_ref())?;
    // What run-vm needs to start this build's VMs again, from wherever the folder is kept.
    let rerun = super::rerun::Rerun {
        guest: super::rerun::RerunGuest::Image { image: image.path.clone(), memory: named },
        timeout_secs: spec.timeout_secs,
        outputs: outputs.clone(),
        inputs: super::rerun::Rerun::store_listing(&outputs),
    };
    rerun.record(&work);
    cfg.test_fault = TestFault::from_env()?;
    // A failed build's outputs are discarded by Nix: the guest packs them only on success.
    // They are unpacked while the VMs are torn down.
    let collect = {
        let (disk, outputs, progress) = (work.join(OUTPUTS_DISK), outputs.clone(), progress.clone());
        move |verdict: &crate::protocol::Verdict| match verdict {
            crate::protocol::Verdict::Exited(0) if !outputs.is_empty() => collect_outputs(&disk, &outputs, &progress),
            _ => Ok(()),
        }
    };
    let result = match runtime()?.block_on(session::run_then(&cfg, progress, collect)) {
        Ok((verdict, Ok(()))) => Ok(verdict),
        Ok((_, Err(e))) => {
            let mut writes: Vec<&Path> = outputs.iter().filter_map(|o| o.parent()).collect();
            writes.push(&work);
            return Err(super::explain_full_disk(&writes, format!("{e}")).unwrap_or(e));
        }
        Err(e) => Err(e),
    };
    super::finish(result, progress, &[&work])
}

/// The archive the guest wrote onto its outputs disk, unpacked into the output paths (and
/// nowhere else); the disk is removed afterwards.
fn collect_outputs(disk: &Path, outputs: &[PathBuf], progress: &Progress) -> Result<(), BuilderError> {
    let file = std::fs::File::open(disk).map_err(io(format!("opening the outputs disk {}", disk.display())))?;
    let started = std::time::Instant::now();
    let done = super::unpack::unpack(file, outputs).map_err(BuilderError::Outputs)?;
    let secs = started.elapsed().as_secs_f64();
    if done.paths == 0 {
        // Nix names each missing output itself.
        progress.say("outputs: the command made none of them");
    } else {
        progress.say(&format!(
            "outputs: {} of {} paths, {} entries, {:.1} MB unpacked in {secs:.2} s ({:.0} MB/s)",
            done.paths,
            outputs.len(),
            done.entries,
            done.bytes as f64 / 1e6,
            done.bytes as f64 / 1e6 / secs.max(0.001),
        ));
    }
    let _ = std::fs::remove_file(disk);
    progress.say("outputs collected");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_env_quotes_and_drops_host_variables() {
        let vars: Vec<(OsString, OsString)> = vec![
            ("out".into(), "/nix/store/x-t".into()),
            ("PATH".into(), "/path-not-set".into()),
            ("msg".into(), "it's here".into()),
            ("bad-name".into(), "x".into()),
            ("raw".into(), OsString::from_vec(b"caf\xe9 'x'".to_vec())),
        ];
        assert_eq!(
            saved_env(vars.into_iter()),
            b"export msg='it'\\''s here'\nexport out=/nix/store/x-t\nexport raw='caf\xe9 '\\''x'\\'''\nexport TMPDIR=/tmp\n".to_vec()
        );
    }

    /// Debian's closure: its library folder, smbd and the agent. nixpkgs' tools: the closure
    /// list they carry, and smbd behind the tools' link; a list without smbd's or the agent's
    /// store path is refused by name, and so are tools with neither.
    #[test]
    fn the_controllers_disk_holds_the_closure_its_tools_name() {
        let dir = tempfile::tempdir().unwrap();
        let (smbd, agent) = (Path::new("/t/bin/smbd"), Path::new("/b/bin/nix-winvm-builder"));
        let (paths, used) = controller_store_paths(Some("/lib".into()), dir.path(), smbd, agent).unwrap();
        assert_eq!(paths, [Path::new("/lib"), smbd, agent]);
        assert_eq!(used, smbd);

        let samba = dir.path().join("samba");
        std::fs::create_dir_all(samba.join("bin")).unwrap();
        std::fs::write(samba.join("bin/smbd"), b"").unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(tools.join("bin")).unwrap();
        std::fs::create_dir_all(tools.join("share/nix-winvm/controller-closure")).unwrap();
        std::os::unix::fs::symlink(samba.join("bin/smbd"), tools.join("bin/smbd")).unwrap();
        let list = tools.join(CONTROLLER_CLOSURE);
        std::fs::write(&list, format!("{}\n/b\n/glibc\n", samba.display())).unwrap();
        let (paths, used) = controller_store_paths(None, &tools, &tools.join("bin/smbd"), agent).unwrap();
        assert_eq!(paths, [samba.clone(), "/b".into(), "/glibc".into()]);
        assert_eq!(used, samba.join("bin/smbd"));

        std::fs::write(&list, "/b\n").unwrap();
        let err = controller_store_paths(None, &tools, &tools.join("bin/smbd"), agent).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{} lists no store path holding {}",
                list.display(),
                samba.join("bin/smbd").display()
            )),
            "{err}"
        );
        let err = controller_store_paths(None, dir.path(), smbd, agent).unwrap_err().to_string();
        assert!(err.contains("the derivation names no winvmToolsLib"), "{err}");
    }

    #[test]
    fn a_layers_failure_is_read_from_the_guests_note() {
        let command = |i: usize| Some(format!("command {i}"));
        assert!(matches!(
            layer_failure("2 7\n", 7, command),
            BuilderError::LayerCommand { index: 2, code: 7, command } if command == "command 1"
        ));
        assert!(matches!(layer_failure("check 1\n", 1, command), BuilderError::LayerCheck));
        for unreadable in ["", "0 3", "x 3", "2"] {
            assert!(
                matches!(
                    layer_failure(unreadable, 3, command),
                    BuilderError::LayerCommand { index: 0, code: 3, command } if command.is_empty()
                ),
                "{unreadable:?}"
            );
        }
    }

    #[test]
    fn original_builder_keeps_argument_boundaries() {
        let spec = BuildSpec { image: ImageSpec::standin(), timeout_secs: 1, run_original_builder: true };
        assert_eq!(
            guest_command(&spec, 2, &[]),
            "cd /tmp && . /tmp/xchg/saved-env && exec \"$winvmOrigBuilder\" \"$winvmArg0\" \"$winvmArg1\""
        );
    }

    #[test]
    fn outputs_are_named_by_the_outputs_variable() {
        let env = |name: &str| match name {
            "outputs" => Some("out dev".into()),
            "out" => Some("/nix/store/aaaa-x".into()),
            "dev" => Some("/nix/store/bbbb-x-dev".into()),
            _ => None,
        };
        assert_eq!(output_paths(env), [PathBuf::from("/nix/store/aaaa-x"), PathBuf::from("/nix/store/bbbb-x-dev")]);
        let only_out = |name: &str| (name == "out").then(|| OsString::from("/nix/store/cccc-y"));
        assert_eq!(output_paths(only_out), [PathBuf::from("/nix/store/cccc-y")]);
    }

    #[test]
    fn the_build_runs_in_a_subshell_between_placing_and_packing_the_outputs() {
        let spec = BuildSpec { image: ImageSpec::standin(), timeout_secs: 1, run_original_builder: false };
        let c = guest_command(&spec, 0, &["/nix/store/aaaa-x".into(), "/nix/store/bbbb-x-dev".into()]);
        assert!(c.starts_with("winvm_outputs='aaaa-x bbbb-x-dev'\n"), "{c}");
        let placed = c.find("winvm_redirect ||").unwrap();
        let built =
            c.find("(cd /tmp && . /tmp/xchg/saved-env && exec /bin/sh -e /tmp/xchg/script)\nwinvm_code=$?").unwrap();
        let packed = c.find("winvm_pack \"$@\" ||").unwrap();
        assert!(
            c.contains("tar -c -f - -C /nix/store \"$@\" | dd of=/dev/vdb bs=4M iflag=fullblock oflag=direct"),
            "{c}"
        );
        assert!(placed < built && built < packed, "{c}");
        assert!(c.trim_end().ends_with("exit \"$winvm_code\""), "{c}");
    }
}
