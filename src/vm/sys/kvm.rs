//! The three KVM ioctls the probe makes (src/vm/accel.rs), numbered by `<linux/kvm.h>`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

#[allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::upper_case_acronyms)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/kvm.rs"));
}

/// The only KVM API version there has ever been; the kernel answers it to KVM_GET_API_VERSION.
pub const API_VERSION: i32 = raw::KVM_API_VERSION as i32;

/// KVM_GET_API_VERSION on an open `/dev/kvm`.
pub fn api_version(kvm: &File) -> io::Result<i32> {
    ioctl(kvm.as_fd(), raw::WINVM_KVM_GET_API_VERSION, 0)
}

/// KVM_CREATE_VM with the default machine type (0): a VM with no memory and no vCPU yet,
/// released when the descriptor closes.
pub fn create_vm(kvm: &File) -> io::Result<OwnedFd> {
    let fd = ioctl(kvm.as_fd(), raw::WINVM_KVM_CREATE_VM, 0)?;
    // SAFETY: on success KVM_CREATE_VM returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// KVM_CREATE_VCPU number `id` in `vm`.
pub fn create_vcpu(vm: &OwnedFd, id: u32) -> io::Result<OwnedFd> {
    let fd = ioctl(vm.as_fd(), raw::WINVM_KVM_CREATE_VCPU, id.into())?;
    // SAFETY: on success KVM_CREATE_VCPU returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: BorrowedFd<'_>, request: raw::winvm_kvm_ioctl, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: these three requests take a plain integer argument, not a pointer, so the kernel
    // reads and writes none of our memory; `fd` is borrowed and stays open during the call. On
    // any other file the kernel refuses the request (ENOTTY) and nothing happens.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
