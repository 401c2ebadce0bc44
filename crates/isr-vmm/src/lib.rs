//! isr-vmm: runs a parcel's VM in QEMU and drives it over QMP.
//!
//! - [`VmConfig`] describes the VM and builds QEMU's command line (disk over NBD on a Unix socket,
//!   virtio-blk; a virtio NIC on user-mode NAT or on nothing; headless, GTK or VNC display).
//! - [`Vm`] starts QEMU cold or from a memory image ([`Start`]), suspends it to a memory image
//!   ([`Vm::suspend`]: `mapped-ram` migration to a `file:`), powers it off, and waits for the guest to
//!   shut down.
//! - [`VmmDriver`] runs the QEMU behind a [`Vm`]: [`QemuDriver`] as a child process (QEMU-direct), or
//!   [`LibvirtDriver`] as a transient libvirt domain ([`libvirt`]); the machine and its memory image format are
//!   the same under both.
//! - [`detect_accel`] tries KVM and falls back to TCG; [`detect_accel_remembered`] keeps the verdict for the
//!   rest of the boot.
//! - [`qmp`] is the QMP client underneath.

mod accel;
pub mod agent;
mod config;
mod driver;
mod error;
mod image;
pub mod libvirt;
pub mod qmp;
mod vm;

pub use accel::{detect_accel, detect_accel_remembered, AccelDetection, KVM_PROBE_TIMEOUT};
pub use agent::GuestAgent;
pub use config::{
    Accel, Display, Network, PciSlots, VmConfig, DEFAULT_QEMU, NIC_ID, NIC_MAC, RAM_BACKEND_ID,
};
pub use driver::{BoxFuture, ProcessExit, QemuDriver, VmmDriver, VmmKind, VmmProcess};
pub use error::VmmError;
pub use image::{inspect_memory_image, MemoryImageInfo};
pub use libvirt::{DomainRef, LibvirtDriver};
pub use vm::{Start, SuspendInfo, Vm, VmExit, MIN_QEMU_MAJOR};
