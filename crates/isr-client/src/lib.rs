//! The isr client library: everything `isr` does, without the command line.
//!
//! - [`transport`]: the server's HTTP API (login, parcels, locks, chunks, versions).
//! - [`home`]: the client's home directory: session, client identity, parcels checked out, chunk cache.
//! - [`cache`]: the local chunk cache (encrypted chunks by tag, shared by all parcels of this client).
//! - [`image`]: a checked-out image (disk or memory) read and written in place: decoded chunks in memory,
//!   dirty chunks encoded into the cache and recorded in a working keyring made durable on flush.
//! - [`manifests`]: manifests opened bound to parcel and version; the highest version seen of each parcel.
//! - [`parcel`]: the [`parcel::Client`] and the lifecycle, one command per module: create, checkout, sync (plan,
//!   upload, commit), checkin, discard, hoard, rollback, check, export, status, password, lock.
//! - [`parcel_files`]: every local file name of a parcel ([`parcel_files::ParcelFiles`]).
//! - [`resume`]: the VM (and `isr disk`): resume, suspend, power off.
//! - [`transient`]: `resume --transient`: a version run without lock or check-in, every change dropped.
//! - [`network`]: IT's network policy and the network a resume gives the VM.
//! - [`source`]: where chunks come from: a stack of chunk sources (coalescing, cache, lookaside, server).
//! - [`control`]: the control socket of a running parcel (a sync while it runs).
//! - [`running`]: what the process running a parcel does beside the guest (background upload, control
//!   requests, periodic syncs).
//! - [`run`]: the run-time records of a running parcel and the cleanup after a run that died.
//! - [`trickle`]: trickle reintegration: a running image's flushed changes sent to the server in the
//!   background.

pub mod access_trace;
pub mod background;
pub mod cache;
pub mod control;
pub mod error;
pub mod guest_ram;
pub mod home;
pub mod image;
pub mod manifests;
pub mod network;
pub mod parcel;
pub mod parcel_files;
pub mod progress;
pub mod resume;
pub mod run;
pub mod running;
pub mod runtime;
pub mod source;
pub mod transient;
pub mod transport;
pub mod trickle;
pub mod xts;

pub use error::ClientError;
