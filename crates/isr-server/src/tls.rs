//! `isr-server tls init`: a private certificate authority and a server certificate signed by it.
//!
//! Clients verify the server the ordinary way (webpki): `isr --ca-cert DIR/ca.pem` trusts the CA, whose
//! certificate is a proper CA (`CA:TRUE`, keyCertSign) and never the server's own certificate, so rustls'
//! rule that a CA certificate is no end entity is kept. The CA's private key is not kept: nothing else can
//! be signed with it, and `tls init` into a fresh directory makes a new CA (clients then need the new
//! `ca.pem`).

use crate::error::ServerError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The names a server certificate holds when none are given.
pub const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];
/// Validity of both certificates.
const VALID_YEARS: i64 = 10;

/// What [`init`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate: what clients trust (`isr --ca-cert`).
    pub ca_cert: PathBuf,
    /// The server's certificate chain (server certificate, then the CA's): `serve --tls-cert`.
    pub cert: PathBuf,
    /// The server's private key (mode 0600): `serve --tls-key`.
    pub key: PathBuf,
}

fn tls_err(e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(e.to_string())
}

/// Sets `params`' validity: from yesterday (clocks differ a little) for [`VALID_YEARS`].
fn set_validity(params: &mut CertificateParams) {
    let now = crate::now_unix();
    let (y, m, d) = crate::civil_date(now - 86_400);
    params.not_before = rcgen::date_time_ymd(y as i32, m as u8, d as u8);
    // Day 28 exists in every month.
    params.not_after = rcgen::date_time_ymd((y + VALID_YEARS) as i32, m as u8, d.min(28) as u8);
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir` (created 0700 if missing) for a server reached as
/// any of `names` (DNS names or IP addresses; [`DEFAULT_NAMES`] when empty). Refuses to overwrite any of
/// them.
pub fn init(dir: &Path, names: &[String]) -> Result<TlsFiles, ServerError> {
    let names: Vec<String> = if names.is_empty() {
        DEFAULT_NAMES.iter().map(|n| (*n).to_owned()).collect()
    } else {
        names.to_vec()
    };
    let files =
        TlsFiles { ca_cert: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    for p in [&files.ca_cert, &files.cert, &files.key] {
        if p.exists() {
            return Err(ServerError::Tls(format!(
                "{} already exists: remove the old files (clients then need the new ca.pem) or choose another --output",
                p.display()
            )));
        }
    }

    let ca_key = KeyPair::generate().map_err(tls_err)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("isr-server CA for {}", names[0]));
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(tls_err)?;

    let server_key = KeyPair::generate().map_err(tls_err)?;
    let mut server = CertificateParams::new(names.clone())
        .map_err(|e| ServerError::Tls(format!("server names {names:?}: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    server.distinguished_name = dn;
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    set_validity(&mut server);
    let issuer = Issuer::new(ca, ca_key);
    let server_cert = server.signed_by(&server_key, &issuer).map_err(tls_err)?;

    isr_store::chunk::create_private_dir(dir)?;
    write_new(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&files.cert, format!("{}{}", server_cert.pem(), ca_cert.pem()).as_bytes(), 0o644)?;
    write_new(&files.key, server_key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

/// Creates `path` (never overwriting) with `mode`, set explicitly.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| ServerError::Io { context: format!("writing {}", path.display()), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}
