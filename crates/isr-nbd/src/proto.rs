//! I/O-free NBD protocol codec (fixed newstyle handshake, option haggling,
//! transmission requests, simple and structured replies).
//!
//! Every `parse_*` function takes the bytes received so far and returns
//! `Ok(None)` when more input is needed, `Ok(Some((frame, consumed)))` when a
//! complete frame is at the front of the buffer, or `Err(_)` when the input can
//! never become valid (bad magic, oversized lengths, unknown flags). The
//! `encode_*` functions append to a `Vec<u8>` or return fixed-size arrays.
//!
//! Both the server side and the client side of each message are implemented,
//! so that the server can be tested with a hand-rolled client.

use crate::NbdError;

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`, first 8 bytes sent by the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle magic; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (never negotiated by this server).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------- flags

/// Handshake flag: server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// All client flags this implementation understands.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flag bits.
pub mod tflags {
    /// Must always be set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// Server supports `NBD_CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// Server supports `NBD_CMD_FLAG_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Export is rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// Server supports `NBD_CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// Server supports `NBD_CMD_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Server supports `NBD_CMD_FLAG_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// Multiple connections are consistent: a flush on one covers writes completed on all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Server supports `NBD_CMD_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// Server supports `NBD_CMD_FLAG_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Block status flags of the `base:allocation` metadata context.
pub mod state {
    /// The extent is not allocated (reads as zero or as unspecified, see `ZERO`).
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server knows, and the id it gives it.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id of [`BASE_ALLOCATION`] in `NBD_REP_META_CONTEXT` and block status replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Command flag bits.
pub mod cflags {
    /// Force unit access: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not deallocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fast zero.
    pub const FAST_ZERO: u16 = 1 << 4;
}

// ---------------------------------------------------------------- options

/// Option codes.
pub mod opt {
    /// Choose the export and enter transmission (no reply on failure).
    pub const EXPORT_NAME: u32 = 1;
    /// Soft disconnect.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Legacy.
    pub const PEEK_EXPORT: u32 = 4;
    /// TLS upgrade (unsupported here).
    pub const STARTTLS: u32 = 5;
    /// Query export information.
    pub const INFO: u32 = 6;
    /// Query export information and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts (unsupported here).
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Set metadata contexts (unsupported here).
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (unsupported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success / end of list.
    pub const ACK: u32 = 1;
    /// Export description (reply to LIST).
    pub const SERVER: u32 = 2;
    /// Information (reply to INFO / GO).
    pub const INFO: u32 = 3;
    /// Metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Option unknown to this server.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Syntactically invalid.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// Unsupported on this platform.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    /// Option payload too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// `NBD_INFO_*` types used inside `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum / preferred / maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command codes.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the request header).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch (unsupported here).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status (unsupported here).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// Structured reply flag: last chunk of this reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty final chunk.
    pub const TYPE_NONE: u16 = 0;
    /// Data at an offset.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// Hole at an offset.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Error for the whole request.
    pub const TYPE_ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// NBD error values (as sent on the wire; these equal Linux errno values).
pub mod errno {
    /// Operation not permitted (e.g. write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (write beyond the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Result of a `parse_*` function: `Ok(None)` = need more bytes,
/// `Ok(Some((frame, consumed)))` = a complete frame.
pub type Parsed<T> = Result<Option<(T, usize)>, NbdError>;

// ---------------------------------------------------------------- helpers

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

// ---------------------------------------------------------------- handshake

/// Length of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;

/// Server: append the fixed newstyle greeting.
pub fn encode_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// Client: parse the server greeting, returning the handshake flags.
pub fn parse_greeting(buf: &[u8]) -> Parsed<u16> {
    if buf.len() < GREETING_LEN {
        return Ok(None);
    }
    let m1 = be64(&buf[0..8]);
    if m1 != NBDMAGIC {
        return Err(NbdError::BadMagic { expected: NBDMAGIC, got: m1 });
    }
    let m2 = be64(&buf[8..16]);
    if m2 != IHAVEOPT {
        return Err(NbdError::BadMagic { expected: IHAVEOPT, got: m2 });
    }
    Ok(Some((be16(&buf[16..18]), GREETING_LEN)))
}

/// Client: append the 32-bit client flags.
pub fn encode_client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Server: parse the client flags. Unknown bits are an error (the spec
/// requires the server to close the connection).
pub fn parse_client_flags(buf: &[u8]) -> Parsed<u32> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let flags = be32(buf);
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(NbdError::UnknownClientFlags(flags));
    }
    Ok(Some((flags, 4)))
}

// ---------------------------------------------------------------- options

/// Length of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// A complete option as sent by the client, data not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOption<'a> {
    /// Option code (`opt::*`).
    pub code: u32,
    /// Option data.
    pub data: &'a [u8],
}

/// Client: append an option.
pub fn encode_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Server: parse one option. Options whose data is longer than `max_len`
/// are rejected with [`NbdError::OptionTooLarge`] as soon as the header is
/// seen (before buffering the data).
pub fn parse_option(buf: &[u8], max_len: u32) -> Parsed<RawOption<'_>> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let magic = be64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(NbdError::BadMagic { expected: IHAVEOPT, got: magic });
    }
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(None);
    }
    let code = be32(&buf[8..12]);
    let len = be32(&buf[12..16]);
    if len > max_len {
        return Err(NbdError::OptionTooLarge { option: code, len, max: max_len });
    }
    let total = OPTION_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((RawOption { code, data: &buf[OPTION_HEADER_LEN..total] }, total)))
}

/// Data of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export name (may be empty: the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` items.
    pub requests: Vec<u16>,
}

/// A decoded option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any option this server does not implement (answer `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries (`namespace:` or `namespace:leaf`); empty asks for every context (LIST only).
    pub queries: Vec<String>,
}

/// At most this many queries in one meta context option.
pub const MAX_META_QUERIES: usize = 128;

/// A known option whose data is malformed; answer `NBD_REP_ERR_INVALID`
/// (or, for `NBD_OPT_EXPORT_NAME`, close the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option {option}: {reason}")]
pub struct InvalidOption {
    /// Option code.
    pub option: u32,
    /// Human readable reason (sent to the client).
    pub reason: &'static str,
}

/// Maximum length of a string in the protocol.
pub const MAX_STRING_LEN: usize = 4096;

fn decode_string(option: u32, b: &[u8]) -> Result<String, InvalidOption> {
    if b.len() > MAX_STRING_LEN {
        return Err(InvalidOption { option, reason: "string longer than 4096 bytes" });
    }
    if b.contains(&0) {
        return Err(InvalidOption { option, reason: "string contains NUL" });
    }
    String::from_utf8(b.to_vec()).map_err(|_| InvalidOption { option, reason: "string is not UTF-8" })
}

fn decode_meta_context_request(option: u32, d: &[u8]) -> Result<MetaContextRequest, InvalidOption> {
    let bad = |reason| InvalidOption { option, reason };
    let mut rest = d;
    let take_string = |rest: &mut &[u8]| -> Result<String, InvalidOption> {
        if rest.len() < 4 {
            return Err(bad("truncated string length"));
        }
        let n = be32(rest) as usize;
        if rest.len() - 4 < n {
            return Err(bad("string length exceeds option length"));
        }
        let s = decode_string(option, &rest[4..4 + n])?;
        *rest = &rest[4 + n..];
        Ok(s)
    };
    let export = take_string(&mut rest)?;
    if rest.len() < 4 {
        return Err(bad("truncated query count"));
    }
    let count = be32(rest) as usize;
    rest = &rest[4..];
    if count > MAX_META_QUERIES {
        return Err(bad("too many queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut rest)?);
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Client: encode the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Data of `NBD_REP_META_CONTEXT`: the context's id and name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

fn decode_info_request(option: u32, d: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let bad = |reason| InvalidOption { option, reason };
    if d.len() < 4 {
        return Err(bad("truncated name length"));
    }
    let name_len = be32(d) as usize;
    let rest = &d[4..];
    if rest.len() < name_len || rest.len() - name_len < 2 {
        return Err(bad("name length exceeds option length"));
    }
    let name = decode_string(option, &rest[..name_len])?;
    let rest = &rest[name_len..];
    let n = be16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return Err(bad("information request count does not match option length"));
    }
    let requests = rest.chunks_exact(2).map(be16).collect();
    Ok(InfoRequest { name, requests })
}

impl ClientOption {
    /// Interpret a raw option.
    pub fn decode(raw: &RawOption<'_>) -> Result<ClientOption, InvalidOption> {
        let option = raw.code;
        let d = raw.data;
        let empty = |v: ClientOption| {
            if d.is_empty() {
                Ok(v)
            } else {
                Err(InvalidOption { option, reason: "option takes no data" })
            }
        };
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(decode_string(option, d)?)),
            opt::ABORT => Ok(ClientOption::Abort), // data is ignored for ABORT
            opt::LIST => empty(ClientOption::List),
            opt::STRUCTURED_REPLY => empty(ClientOption::StructuredReply),
            opt::INFO => Ok(ClientOption::Info(decode_info_request(option, d)?)),
            opt::GO => Ok(ClientOption::Go(decode_info_request(option, d)?)),
            opt::LIST_META_CONTEXT => {
                Ok(ClientOption::ListMetaContext(decode_meta_context_request(option, d)?))
            }
            opt::SET_META_CONTEXT => {
                Ok(ClientOption::SetMetaContext(decode_meta_context_request(option, d)?))
            }
            other => Ok(ClientOption::Unsupported(other)),
        }
    }
}

/// Client: encode the data of an `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Server: append an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len());
    b.extend_from_slice(&info::NAME.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Data of `NBD_REP_SERVER`.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// An option reply (client side view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply<'a> {
    /// Option being answered.
    pub option: u32,
    /// `rep::*`.
    pub reply_type: u32,
    /// Reply data.
    pub data: &'a [u8],
}

/// Client: parse an option reply (data capped at `max_len`).
pub fn parse_option_reply(buf: &[u8], max_len: u32) -> Parsed<OptionReply<'_>> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let magic = be64(buf);
    if magic != OPT_REPLY_MAGIC {
        return Err(NbdError::BadMagic { expected: OPT_REPLY_MAGIC, got: magic });
    }
    if buf.len() < OPTION_REPLY_HEADER_LEN {
        return Ok(None);
    }
    let option = be32(&buf[8..12]);
    let reply_type = be32(&buf[12..16]);
    let len = be32(&buf[16..20]);
    if len > max_len {
        return Err(NbdError::OptionTooLarge { option, len, max: max_len });
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((OptionReply { option, reply_type, data: &buf[OPTION_REPLY_HEADER_LEN..total] }, total)))
}

/// Server: append the reply to `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, transmission_flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Client: parse the reply to `NBD_OPT_EXPORT_NAME`: (size, transmission flags).
pub fn parse_export_name_reply(buf: &[u8], no_zeroes: bool) -> Parsed<(u64, u16)> {
    let total = if no_zeroes { 10 } else { 134 };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(((be64(buf), be16(&buf[8..10])), total)))
}

// ---------------------------------------------------------------- transmission

/// Length of a (compact) request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else (answered with `EINVAL`).
    Unknown(u16),
}

impl Command {
    /// Decode a command code.
    pub fn from_code(c: u16) -> Command {
        match c {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disc,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::CACHE => Command::Cache,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
    /// Encode to a command code.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disc => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::Cache => cmd::CACHE,
            Command::BlockStatus => cmd::BLOCK_STATUS,
            Command::Unknown(c) => c,
        }
    }
    /// Does this command modify the export?
    pub fn is_write(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// A transmission request header. For `Write`, `len` bytes of payload follow
/// the header on the wire; they are *not* part of the parsed frame, so the
/// caller can read them straight into its own buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflags::*`).
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Number of payload bytes following the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.command == Command::Write {
            self.len as usize
        } else {
            0
        }
    }
}

/// Server: parse a request header. A `Write` whose payload exceeds
/// `max_payload` is a fatal error (the server cannot reasonably consume it);
/// other oversized requests are returned so the server can answer `EINVAL`.
pub fn parse_request(buf: &[u8], max_payload: u32) -> Parsed<Request> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = be32(buf);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadMagic { expected: REQUEST_MAGIC as u64, got: magic as u64 });
    }
    if buf.len() < REQUEST_LEN {
        return Ok(None);
    }
    let req = Request {
        flags: be16(&buf[4..6]),
        command: Command::from_code(be16(&buf[6..8])),
        handle: be64(&buf[8..16]),
        offset: be64(&buf[16..24]),
        len: be32(&buf[24..28]),
    };
    if req.command == Command::Write && req.len > max_payload {
        return Err(NbdError::RequestTooLarge { len: req.len, max: max_payload });
    }
    Ok(Some((req, REQUEST_LEN)))
}

/// Client: encode a request header (append the payload yourself for writes).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.command.code().to_be_bytes());
    b[8..16].copy_from_slice(&req.handle.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.len.to_be_bytes());
    b
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of the header of an `OFFSET_DATA` chunk including its offset field.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// Server: simple reply header (read data, if any, follows).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Server: structured reply chunk header.
pub fn encode_structured_header(flags: u16, ty: u16, handle: u64, len: u32) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Server: final `OFFSET_DATA` chunk header (header + offset); `data_len`
/// bytes of data follow.
pub fn encode_offset_data_header(handle: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_HEADER_LEN] {
    encode_offset_data_chunk_header(reply::FLAG_DONE, handle, offset, data_len)
}

/// Server: `OFFSET_DATA` chunk header with `flags` (header + offset); `data_len` bytes of data follow.
pub fn encode_offset_data_chunk_header(
    flags: u16,
    handle: u64,
    offset: u64,
    data_len: u32,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&encode_structured_header(
        flags,
        reply::TYPE_OFFSET_DATA,
        handle,
        data_len + 8,
    ));
    b[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Length of an `OFFSET_HOLE` chunk (header, offset, hole length).
pub const OFFSET_HOLE_LEN: usize = STRUCTURED_HEADER_LEN + 12;

/// Server: `OFFSET_HOLE` chunk with `flags`: `len` bytes at `offset` read as zeroes.
pub fn encode_offset_hole(flags: u16, handle: u64, offset: u64, len: u32) -> [u8; OFFSET_HOLE_LEN] {
    let mut b = [0u8; OFFSET_HOLE_LEN];
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&encode_structured_header(
        flags,
        reply::TYPE_OFFSET_HOLE,
        handle,
        12,
    ));
    b[STRUCTURED_HEADER_LEN..STRUCTURED_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    b[STRUCTURED_HEADER_LEN + 8..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Server: final `NONE` chunk.
pub fn encode_structured_none(handle: u64) -> [u8; STRUCTURED_HEADER_LEN] {
    encode_structured_header(reply::FLAG_DONE, reply::TYPE_NONE, handle, 0)
}

/// One extent of a block status reply: `len` bytes with `state::*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0 on the wire).
    pub len: u32,
    /// `state::*` bits.
    pub flags: u32,
}

/// Server: append a final `BLOCK_STATUS` chunk for `context` with `extents`.
pub fn encode_block_status(out: &mut Vec<u8>, handle: u64, context: u32, extents: &[Extent]) {
    out.extend_from_slice(&encode_structured_header(
        reply::FLAG_DONE,
        reply::TYPE_BLOCK_STATUS,
        handle,
        4 + 8 * extents.len() as u32,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.len.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

/// Client: a `BLOCK_STATUS` chunk payload as (context id, extents); `None` when malformed.
pub fn parse_block_status_payload(payload: &[u8]) -> Option<(u32, Vec<Extent>)> {
    if payload.len() < 4 || !(payload.len() - 4).is_multiple_of(8) {
        return None;
    }
    let context = be32(payload);
    let extents =
        payload[4..].chunks_exact(8).map(|e| Extent { len: be32(e), flags: be32(&e[4..]) }).collect();
    Some((context, extents))
}

/// Server: append a final `ERROR` chunk with a human readable message.
pub fn encode_structured_error(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    out.extend_from_slice(&encode_structured_header(
        reply::FLAG_DONE,
        reply::TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A reply header as seen by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader<'a> {
    /// Simple reply; for a successful read, `len` bytes of data follow and are
    /// not included (the client must know the request length).
    Simple {
        /// Error (0 = success).
        error: u32,
        /// Handle.
        handle: u64,
    },
    /// One complete structured chunk.
    Structured {
        /// `reply::FLAG_*`.
        flags: u16,
        /// `reply::TYPE_*`.
        ty: u16,
        /// Handle.
        handle: u64,
        /// Chunk payload.
        payload: &'a [u8],
    },
}

/// Client: parse a simple reply header or a complete structured chunk.
pub fn parse_reply(buf: &[u8], max_payload: u32) -> Parsed<ReplyHeader<'_>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match be32(buf) {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_LEN {
                return Ok(None);
            }
            Ok(Some((
                ReplyHeader::Simple { error: be32(&buf[4..8]), handle: be64(&buf[8..16]) },
                SIMPLE_REPLY_LEN,
            )))
        }
        STRUCTURED_REPLY_MAGIC => {
            if buf.len() < STRUCTURED_HEADER_LEN {
                return Ok(None);
            }
            let len = be32(&buf[16..20]);
            if len > max_payload.saturating_add(8) {
                return Err(NbdError::RequestTooLarge { len, max: max_payload });
            }
            let total = STRUCTURED_HEADER_LEN + len as usize;
            if buf.len() < total {
                return Ok(None);
            }
            Ok(Some((
                ReplyHeader::Structured {
                    flags: be16(&buf[4..6]),
                    ty: be16(&buf[6..8]),
                    handle: be64(&buf[8..16]),
                    payload: &buf[STRUCTURED_HEADER_LEN..total],
                },
                total,
            )))
        }
        other => Err(NbdError::BadMagic { expected: SIMPLE_REPLY_MAGIC as u64, got: other as u64 }),
    }
}

/// Client: split an `ERROR` chunk payload into (error, message).
pub fn parse_error_payload(payload: &[u8]) -> Option<(u32, &[u8])> {
    if payload.len() < 6 {
        return None;
    }
    let err = be32(payload);
    let mlen = be16(&payload[4..6]) as usize;
    let msg = payload.get(6..6 + mlen)?;
    Some((err, msg))
}

/// Map an I/O error from a device to an NBD error value.
pub fn io_error_to_errno(e: &std::io::Error) -> u32 {
    use std::io::ErrorKind as K;
    if let Some(code) = e.raw_os_error() {
        match code {
            1 | 13 | 30 => return errno::EPERM, // EPERM, EACCES, EROFS
            12 => return errno::ENOMEM,
            22 => return errno::EINVAL,
            27 | 28 | 122 => return errno::ENOSPC, // EFBIG, ENOSPC, EDQUOT
            75 => return errno::EOVERFLOW,
            95 => return errno::ENOTSUP,
            _ => {}
        }
    }
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => errno::EPERM,
        K::InvalidInput => errno::EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => errno::ENOSPC,
        K::OutOfMemory => errno::ENOMEM,
        K::Unsupported => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opt_bytes(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_option(&mut v, code, data);
        v
    }

    /// Every strict prefix of a complete frame must parse as "need more".
    fn assert_prefixes_incomplete(frame: &[u8], complete: impl Fn(&[u8]) -> Result<bool, NbdError>) {
        for i in 0..frame.len() {
            match complete(&frame[..i]) {
                Ok(false) => {}
                other => panic!("prefix of {i} bytes: {other:?}"),
            }
        }
        assert!(complete(frame).unwrap(), "full frame incomplete");
    }

    #[test]
    fn greeting_roundtrip_and_bytes() {
        let mut v = Vec::new();
        encode_greeting(&mut v, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(v, b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(parse_greeting(&v).unwrap(), Some((3, 18)));
        assert_prefixes_incomplete(&v, |b| parse_greeting(b).map(|o| o.is_some()));
        v[0] = b'X';
        assert!(matches!(parse_greeting(&v), Err(NbdError::BadMagic { .. })));
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]).unwrap(), Some((3, 4)));
        assert_eq!(parse_client_flags(&[0, 0, 0, 1, 0xff]).unwrap(), Some((1, 4)));
        assert_eq!(parse_client_flags(&[0, 0, 0, 0]).unwrap(), Some((0, 4)));
        assert_eq!(parse_client_flags(&[0, 0, 0]).unwrap(), None);
        assert!(matches!(parse_client_flags(&[0, 0, 0, 4]), Err(NbdError::UnknownClientFlags(4))));
    }

    #[test]
    fn option_frames() {
        let v = opt_bytes(opt::EXPORT_NAME, b"disk");
        assert_eq!(&v[..8], b"IHAVEOPT");
        assert_eq!(&v[8..16], &[0, 0, 0, 1, 0, 0, 0, 4]);
        let (raw, n) = parse_option(&v, 1024).unwrap().unwrap();
        assert_eq!(n, 20);
        assert_eq!(raw, RawOption { code: 1, data: b"disk" });
        assert_eq!(ClientOption::decode(&raw).unwrap(), ClientOption::ExportName("disk".into()));
        assert_prefixes_incomplete(&v, |b| parse_option(b, 1024).map(|o| o.is_some()));

        // Trailing bytes belong to the next frame.
        let mut two = opt_bytes(opt::LIST, &[]);
        two.extend_from_slice(&opt_bytes(opt::ABORT, &[]));
        let (raw, n) = parse_option(&two, 1024).unwrap().unwrap();
        assert_eq!((raw.code, n), (opt::LIST, 16));
        assert_eq!(parse_option(&two[n..], 1024).unwrap().unwrap().0.code, opt::ABORT);

        let decode = |code, data: &[u8]| ClientOption::decode(&RawOption { code, data });
        assert_eq!(decode(opt::ABORT, &[]).unwrap(), ClientOption::Abort);
        assert_eq!(decode(opt::LIST, &[]).unwrap(), ClientOption::List);
        assert_eq!(decode(opt::STRUCTURED_REPLY, &[]).unwrap(), ClientOption::StructuredReply);
        let go = encode_info_request("x", &[info::NAME, info::BLOCK_SIZE]);
        assert_eq!(go, [0, 0, 0, 1, b'x', 0, 2, 0, 1, 0, 3]);
        let req = InfoRequest { name: "x".into(), requests: vec![1, 3] };
        assert_eq!(decode(opt::GO, &go).unwrap(), ClientOption::Go(req.clone()));
        assert_eq!(decode(opt::INFO, &go).unwrap(), ClientOption::Info(req));
        assert_eq!(
            decode(opt::GO, &encode_info_request("", &[])).unwrap(),
            ClientOption::Go(InfoRequest { name: String::new(), requests: vec![] })
        );
        let meta = encode_meta_context_request("", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let want = MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        };
        assert_eq!(decode(opt::SET_META_CONTEXT, &meta).unwrap(), ClientOption::SetMetaContext(want.clone()));
        assert_eq!(decode(opt::LIST_META_CONTEXT, &meta).unwrap(), ClientOption::ListMetaContext(want));
        assert!(decode(opt::SET_META_CONTEXT, b"whatever").is_err(), "malformed meta context data");
        for code in [opt::STARTTLS, opt::EXTENDED_HEADERS, 0, u32::MAX] {
            assert_eq!(decode(code, b"whatever").unwrap(), ClientOption::Unsupported(code));
        }
    }

    #[test]
    fn invalid_option_data() {
        let decode = |code, data: &[u8]| ClientOption::decode(&RawOption { code, data });
        assert!(decode(opt::LIST, b"x").is_err());
        assert!(decode(opt::STRUCTURED_REPLY, b"x").is_err());
        assert!(decode(opt::EXPORT_NAME, b"a\0b").is_err());
        assert!(decode(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(decode(opt::EXPORT_NAME, &vec![b'a'; MAX_STRING_LEN + 1]).is_err());
        assert!(decode(opt::GO, &[]).is_err());
        assert!(decode(opt::GO, &[0, 0, 0, 0, 0]).is_err()); // missing count byte
        assert!(decode(opt::GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err()); // huge name length
        assert!(decode(opt::INFO, &[0, 0, 0, 0, 0, 1]).is_err()); // count 1, no entries
        assert!(decode(opt::INFO, &[0, 0, 0, 0, 0, 0, 0]).is_err()); // trailing byte
    }

    #[test]
    fn option_errors() {
        let mut v = opt_bytes(opt::LIST, &[]);
        v[3] = b'X';
        assert!(matches!(parse_option(&v, 1024), Err(NbdError::BadMagic { .. })));
        // Oversized: rejected from the header alone, before the data arrives.
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&opt::GO.to_be_bytes());
        hdr.extend_from_slice(&(64u32 * 1024 + 1).to_be_bytes());
        assert!(matches!(parse_option(&hdr, 64 * 1024), Err(NbdError::OptionTooLarge { len: 65537, .. })));
        assert_eq!(parse_option(&hdr[..15], 64 * 1024).unwrap(), None);
    }

    #[test]
    fn option_replies() {
        let mut v = Vec::new();
        encode_option_reply(
            &mut v,
            opt::GO,
            rep::INFO,
            &info_export(1 << 30, tflags::HAS_FLAGS | tflags::SEND_FLUSH),
        );
        assert_eq!(&v[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&v[8..20], &[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12]);
        assert_eq!(&v[20..], &[0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 5]);
        let (r, n) = parse_option_reply(&v, 1024).unwrap().unwrap();
        assert_eq!((r.option, r.reply_type, r.data.len(), n), (opt::GO, rep::INFO, 12, 32));
        assert_prefixes_incomplete(&v, |b| parse_option_reply(b, 1024).map(|o| o.is_some()));
        assert_eq!(info_block_size(1, 4096, 1 << 25), [0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(info_name("ab"), [0, 1, b'a', b'b']);
        assert_eq!(rep_server("ab"), [0, 0, 0, 2, b'a', b'b']);
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);

        let mut e = Vec::new();
        encode_export_name_reply(&mut e, 4096, 1, true);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]);
        assert_eq!(parse_export_name_reply(&e, true).unwrap(), Some(((4096, 1), 10)));
        e.clear();
        encode_export_name_reply(&mut e, 4096, 1, false);
        assert_eq!(e.len(), 134);
        assert_eq!(parse_export_name_reply(&e[..133], false).unwrap(), None);
    }

    fn req_bytes(flags: u16, command: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn requests() {
        let cases = [
            (cmd::READ, Command::Read, 0),
            (cmd::WRITE, Command::Write, 4096),
            (cmd::DISC, Command::Disc, 0),
            (cmd::FLUSH, Command::Flush, 0),
            (cmd::TRIM, Command::Trim, 0),
            (cmd::WRITE_ZEROES, Command::WriteZeroes, 0),
            (cmd::CACHE, Command::Cache, 0),
            (cmd::BLOCK_STATUS, Command::BlockStatus, 0),
            (0xffff, Command::Unknown(0xffff), 0),
        ];
        for (code, command, payload) in cases {
            let b = req_bytes(cflags::FUA, code, 0x1122_3344_5566_7788, 1 << 40, 4096);
            let (r, n) = parse_request(&b, 1 << 25).unwrap().unwrap();
            assert_eq!(n, REQUEST_LEN);
            assert_eq!(
                r,
                Request {
                    flags: cflags::FUA,
                    command,
                    handle: 0x1122_3344_5566_7788,
                    offset: 1 << 40,
                    len: 4096
                }
            );
            assert_eq!(r.payload_len(), payload);
            assert_eq!(encode_request(&r).as_slice(), b.as_slice());
            assert_prefixes_incomplete(&b, |x| parse_request(x, 1 << 25).map(|o| o.is_some()));
        }
        // The payload is not part of the frame.
        let mut w = req_bytes(0, cmd::WRITE, 1, 0, 3);
        w.extend_from_slice(b"abc");
        assert_eq!(parse_request(&w, 1 << 25).unwrap().unwrap().1, REQUEST_LEN);
        // Oversized write is fatal; oversized read is left to the server (EINVAL).
        assert!(matches!(
            parse_request(&req_bytes(0, cmd::WRITE, 1, 0, (1 << 25) + 1), 1 << 25),
            Err(NbdError::RequestTooLarge { .. })
        ));
        assert!(parse_request(&req_bytes(0, cmd::READ, 1, 0, u32::MAX), 1 << 25).unwrap().is_some());
        // Bad magic (including extended headers, never negotiated) is detected early.
        assert!(matches!(parse_request(b"\x21\xe4\x1c\x71", 1 << 25), Err(NbdError::BadMagic { .. })));
        assert!(matches!(parse_request(b"GET / HTTP/1.1", 1 << 25), Err(NbdError::BadMagic { .. })));
    }

    #[test]
    fn replies() {
        let s = encode_simple_reply(errno::EINVAL, 9);
        assert_eq!(s, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(parse_reply(&s, 1024).unwrap(), Some((ReplyHeader::Simple { error: 22, handle: 9 }, 16)));
        assert_prefixes_incomplete(&s, |b| parse_reply(b, 1024).map(|o| o.is_some()));

        let mut d = encode_offset_data_header(5, 4096, 3).to_vec();
        d.extend_from_slice(b"xyz");
        assert_eq!(&d[..4], &[0x66, 0x8e, 0x33, 0xef]);
        let (r, n) = parse_reply(&d, 1024).unwrap().unwrap();
        assert_eq!(n, d.len());
        let mut payload = 4096u64.to_be_bytes().to_vec();
        payload.extend_from_slice(b"xyz");
        assert_eq!(
            r,
            ReplyHeader::Structured {
                flags: reply::FLAG_DONE,
                ty: reply::TYPE_OFFSET_DATA,
                handle: 5,
                payload: &payload
            }
        );
        assert_prefixes_incomplete(&d, |b| parse_reply(b, 1024).map(|o| o.is_some()));

        let none = encode_structured_none(6);
        assert_eq!(
            parse_reply(&none, 0).unwrap().unwrap().0,
            ReplyHeader::Structured { flags: 1, ty: 0, handle: 6, payload: &[] }
        );

        let mut e = Vec::new();
        encode_structured_error(&mut e, 7, errno::EIO, "boom");
        let (r, _) = parse_reply(&e, 1024).unwrap().unwrap();
        let ReplyHeader::Structured { ty, payload, .. } = r else { panic!() };
        assert_eq!(ty, reply::TYPE_ERROR);
        assert_eq!(parse_error_payload(payload), Some((errno::EIO, &b"boom"[..])));
        assert_eq!(parse_error_payload(&[0, 0, 0, 5, 0, 9]), None);
        assert!(parse_reply(b"\0\0\0\0", 1024).is_err());
    }

    #[test]
    fn errno_mapping() {
        use std::io::{Error, ErrorKind};
        assert_eq!(io_error_to_errno(&Error::other("x")), errno::EIO);
        assert_eq!(io_error_to_errno(&Error::from(ErrorKind::InvalidInput)), errno::EINVAL);
        assert_eq!(io_error_to_errno(&Error::from(ErrorKind::PermissionDenied)), errno::EPERM);
        assert_eq!(io_error_to_errno(&Error::from(ErrorKind::ReadOnlyFilesystem)), errno::EPERM);
        assert_eq!(io_error_to_errno(&Error::from(ErrorKind::StorageFull)), errno::ENOSPC);
        assert_eq!(io_error_to_errno(&Error::from(ErrorKind::UnexpectedEof)), errno::EIO);
        assert_eq!(io_error_to_errno(&Error::from_raw_os_error(28)), errno::ENOSPC);
        assert_eq!(io_error_to_errno(&Error::from_raw_os_error(30)), errno::EPERM);
        assert_eq!(io_error_to_errno(&Error::from_raw_os_error(5)), errno::EIO);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parsers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200), max in 0u32..100_000) {
            let _ = parse_greeting(&buf);
            let _ = parse_client_flags(&buf);
            if let Ok(Some((raw, n))) = parse_option(&buf, max) {
                prop_assert!(n <= buf.len());
                let _ = ClientOption::decode(&raw);
            }
            let _ = parse_option_reply(&buf, max);
            let _ = parse_export_name_reply(&buf, max % 2 == 0);
            if let Ok(Some((_, n))) = parse_request(&buf, max) {
                prop_assert_eq!(n, REQUEST_LEN);
            }
            if let Ok(Some((_, n))) = parse_reply(&buf, max) {
                prop_assert!(n <= buf.len());
            }
            let _ = parse_error_payload(&buf);
            if let Some((_, extents)) = parse_block_status_payload(&buf) {
                prop_assert_eq!(4 + 8 * extents.len(), buf.len());
            }
        }

        #[test]
        fn meta_context_request_roundtrip(
            export in "[a-z0-9/._-]{0,20}",
            queries in proptest::collection::vec("[a-z]{1,8}:[a-z_]{0,12}", 0..6),
            opt_code in prop_oneof![Just(opt::LIST_META_CONTEXT), Just(opt::SET_META_CONTEXT)],
        ) {
            let q: Vec<&str> = queries.iter().map(String::as_str).collect();
            let data = encode_meta_context_request(&export, &q);
            let want = MetaContextRequest { export: export.clone(), queries: queries.clone() };
            let decoded = ClientOption::decode(&RawOption { code: opt_code, data: &data }).unwrap();
            match decoded {
                ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => prop_assert_eq!(r, want),
                other => prop_assert!(false, "decoded as {:?}", other),
            }
            // Every strict prefix is malformed (a length or a string is cut), never a different request.
            for i in 0..data.len() {
                let cut = ClientOption::decode(&RawOption { code: opt_code, data: &data[..i] });
                prop_assert!(cut.is_err(), "prefix {} decoded: {:?}", i, cut);
            }
        }

        #[test]
        fn block_status_roundtrip(handle: u64, context: u32, raw in proptest::collection::vec((1u32.., 0u32..4), 0..20)) {
            let extents: Vec<Extent> = raw.iter().map(|&(len, flags)| Extent { len, flags }).collect();
            let mut out = Vec::new();
            encode_block_status(&mut out, handle, context, &extents);
            let (reply, n) = parse_reply(&out, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            for i in 0..out.len() {
                prop_assert!(parse_reply(&out[..i], 1 << 20).unwrap().is_none());
            }
            match reply {
                ReplyHeader::Structured { flags, ty, handle: h, payload } => {
                    prop_assert_eq!((flags, ty, h), (reply::FLAG_DONE, reply::TYPE_BLOCK_STATUS, handle));
                    prop_assert_eq!(parse_block_status_payload(payload), Some((context, extents)));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn option_data_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ClientOption::decode(&RawOption { code, data: &data });
        }

        #[test]
        fn magic_prefixed_garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..64), max in 0u32..1024) {
            // Force past the magic checks to reach the length handling.
            for magic in [&IHAVEOPT.to_be_bytes()[..], &REQUEST_MAGIC.to_be_bytes()[..], &OPT_REPLY_MAGIC.to_be_bytes()[..],
                          &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..], &SIMPLE_REPLY_MAGIC.to_be_bytes()[..]] {
                let mut b = magic.to_vec();
                b.extend_from_slice(&tail);
                let _ = parse_option(&b, max).map(|o| o.map(|(r, _)| ClientOption::decode(&r)));
                let _ = parse_request(&b, max);
                let _ = parse_option_reply(&b, max);
                let _ = parse_reply(&b, max);
            }
        }

        #[test]
        fn request_roundtrip(flags: u16, code: u16, handle: u64, offset: u64, len in 0u32..(1 << 25)) {
            let r = Request { flags, command: Command::from_code(code), handle, offset, len };
            let b = encode_request(&r);
            prop_assert_eq!(parse_request(&b, 1 << 25).unwrap(), Some((r, REQUEST_LEN)));
        }

        #[test]
        fn info_request_roundtrip(name in "[a-z0-9/._-]{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..10)) {
            let data = encode_info_request(&name, &reqs);
            let frame = opt_bytes(opt::GO, &data);
            let (raw, n) = parse_option(&frame, 1 << 16).unwrap().unwrap();
            prop_assert_eq!(n, frame.len());
            prop_assert_eq!(ClientOption::decode(&raw).unwrap(), ClientOption::Go(InfoRequest { name, requests: reqs }));
        }
    }
}
