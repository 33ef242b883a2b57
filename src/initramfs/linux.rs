//! What every Linux VM of the project boots with (the controller, the standin guest and its
//! installer): a static busybox, the kernel modules it needs in load order, and the start of
//! its /init.

use super::{module_closure, Initramfs, InitramfsError};
use std::path::Path;

/// What every init of this project's Linux VMs starts with: busybox's applets, the kernel's
/// file systems, and the modules in load order (skipping any a boot initramfs loaded already).
pub const INIT_PREAMBLE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/load-order); do
    n=$(echo "${m%.ko}" | tr - _)
    grep -q "^$n " /proc/modules || insmod "/lib/modules/$m" || echo "winvm-init: loading $m failed"
done
"#;

/// Building one of these initramfs images failed: which part (the busybox, a kernel module,
/// an init), and the archive's or the module resolver's own error.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct LinuxInitError {
    pub what: &'static str,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// `map_err(err("which part"))`.
pub fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &'static str) -> impl FnOnce(E) -> LinuxInitError {
    move |e| LinuxInitError { what, source: e.into() }
}

/// Adds busybox (static; its applets are installed at boot) and `modules` with their
/// dependencies, plus the load order, under `root`.
pub fn add_busybox_and_modules(
    img: &mut Initramfs,
    root: &str,
    busybox: &Path,
    modules_dir: &Path,
    modules: &[&str],
) -> Result<(), LinuxInitError> {
    let e = err::<InitramfsError>;
    img.host_file(format!("{root}/bin/busybox"), busybox, Some(0o755)).map_err(e("busybox"))?;
    let order = module_closure(modules_dir, modules).map_err(err("kernel modules"))?;
    let mut names = String::new();
    for m in &order {
        let name = m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        img.host_file(format!("{root}/lib/modules/{name}"), m, Some(0o644)).map_err(e("kernel module"))?;
        names.push_str(&name);
        names.push('\n');
    }
    img.file(format!("{root}/lib/modules/load-order"), 0o644, names.into_bytes()).map_err(e("load order"))?;
    Ok(())
}

/// An initramfs with busybox and `modules`; the caller adds /init.
pub fn base(busybox: &Path, modules_dir: &Path, modules: &[&str]) -> Result<Initramfs, LinuxInitError> {
    let mut img = Initramfs::new();
    add_busybox_and_modules(&mut img, "", busybox, modules_dir, modules)?;
    Ok(img)
}

/// A complete /init: the common preamble, then `body`, with the VM network's addresses filled
/// in (`@GUEST_IP@`, `@CONTROLLER_IP@`).
pub fn init(body: &str) -> Vec<u8> {
    crate::spec::with_addresses(&format!("{INIT_PREAMBLE}{body}")).into_bytes()
}
