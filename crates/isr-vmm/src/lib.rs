//! isr-vmm: runs a parcel's VM in QEMU and drives it over QMP.
//!
//! - [`VmConfig`] describes the VM and builds QEMU's command line (disk over NBD on a Unix socket,
//!   virtio-blk; a virtio NIC on user-mode NAT or on nothing; headless, GTK or VNC display).
//! - [`Vm`] starts QEMU cold or from a memory image ([`Start`]), suspends it to a memory image
//!   ([`Vm::suspend`]: `mapped-ram` migration to a `file:`), powers it off, and waits for the guest to
//!   shut down.
//! - [`detect_accel`] tries KVM and falls back to TCG.
//! - [`qmp`] is the QMP client underneath.

mod accel;
pub mod agent;
mod config;
mod error;
mod image;
pub mod qmp;
mod vm;

pub use accel::{detect_accel, AccelDetection, KVM_PROBE_TIMEOUT};
pub use agent::GuestAgent;
pub use config::{Accel, Display, Network, VmConfig, DEFAULT_QEMU, NIC_ID, NIC_MAC};
pub use error::VmmError;
pub use image::{inspect_memory_image, MemoryImageInfo};
pub use vm::{Start, SuspendInfo, Vm, VmExit, MIN_QEMU_MAJOR};
