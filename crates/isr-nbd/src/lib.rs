//! NBD server exporting the parcel's virtual disk to QEMU (and `qemu-io`,
//! `qemu-img`) over a Unix socket.
//!
//! * [`proto`]: an I/O-free codec for the NBD protocol (fixed newstyle
//!   handshake, option haggling, requests, simple and structured replies).
//! * [`BlockDevice`]: the trait the virtual disk implements. Besides the six
//!   required methods it has defaulted `read_owned`/`write_owned` variants
//!   taking an owned `Vec<u8>`, which the server always calls; a device doing
//!   I/O on another thread can override them to avoid a copy (see
//!   [`FileDevice`]). `write_zeroes_no_hole` (default: `write_zeroes`) serves
//!   `NBD_CMD_FLAG_NO_HOLE`.
//! * [`serve`] / [`serve_with_options`]: accept loop on a `UnixListener`;
//!   [`handle_connection`] / [`handle_split`]: one connection over any stream.
//!
//! Supported: `NBD_OPT_EXPORT_NAME`, `GO`, `INFO` (replying `NBD_INFO_EXPORT`,
//! `NBD_INFO_BLOCK_SIZE` and on request `NBD_INFO_NAME`), `ABORT`, `LIST`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the one
//! context `base:allocation`); every other option gets `NBD_REP_ERR_UNSUP`
//! (no TLS, no extended headers). Commands: `READ`, `WRITE`, `DISC`, `FLUSH`,
//! `TRIM`, `WRITE_ZEROES` with `FUA`, `NO_HOLE` and `FAST_ZERO`, `CACHE`,
//! `BLOCK_STATUS` (with `REQ_ONE`); others get `EINVAL`. A structured read
//! without `DF` sends the ranges the device reports as zeroes
//! ([`BlockDevice::read_scattered`]) as `OFFSET_HOLE` chunks, without
//! their bytes, and bytes the device holds in its own buffers straight
//! from those (one vectored write, no copy). `CAN_MULTI_CONN` is
//! advertised for a read-only export or a device that says every connection
//! sees one consistent state ([`BlockDevice::multi_conn_consistent`]).
//!
//! Requests on one connection run concurrently (64 by default); replies go
//! out in completion order through a single writer that batches them with
//! vectored writes. A `FLUSH` is answered only after every write-type request
//! received before it has completed and the device flushed; `FUA` is
//! write-then-flush.

mod device;
pub mod proto;
mod server;

pub use device::{spans_of_holes, zero_runs, BlockDevice, FileDevice, MemDevice, ReadSpan};
pub use server::{handle_connection, handle_split, serve, serve_with_options, ServeOptions};

/// Errors that end an NBD connection (or the server).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a wrong magic number.
    #[error("bad magic: expected {expected:#x}, got {got:#x}")]
    BadMagic {
        /// Expected magic.
        expected: u64,
        /// Received value.
        got: u64,
    },
    /// The client sent handshake flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Option data larger than the configured maximum.
    #[error("option {option} too large: {len} > {max} bytes")]
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Announced length.
        len: u32,
        /// Maximum accepted.
        max: u32,
    },
    /// Write payload (or reply payload, client side) larger than the maximum.
    #[error("request payload too large: {len} > {max} bytes")]
    RequestTooLarge {
        /// Announced length.
        len: u32,
        /// Maximum accepted.
        max: u32,
    },
    /// Malformed `NBD_OPT_EXPORT_NAME` (cannot be answered with an error).
    #[error("invalid export name: {0}")]
    InvalidExportName(proto::InvalidOption),
    /// The client kept sending options.
    #[error("too many options during handshake")]
    TooManyOptions,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message")]
    UnexpectedEof,
}
