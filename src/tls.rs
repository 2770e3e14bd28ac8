//! TLS client settings: from a map's (or the shared cache's) `tls_*` keys to
//! a rustls `ClientConfig`, and rustls errors in words an operator acts on.
//!
//! Trust is the system store by default (`SSL_CERT_FILE`, else Debian's
//! `/etc/ssl/certs/ca-certificates.crt`), or a private CA file; TLS 1.2 and
//! 1.3 only (rustls has nothing older); verification cannot be turned off.
//! A client certificate and key make mutual TLS. Every file is read and
//! checked when the configuration is loaded (so `--check` and a reload report
//! a bad file on its line), and the result carries a fingerprint of its
//! inputs: a reload whose files did not change keeps the same `ClientConfig`,
//! and with it the TLS session cache that lets new connections resume. The
//! crypto is ring's (builds with a C compiler alone). This module owns no
//! socket; [`crate::transport`] drives a connection.

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the system's trusted CAs are, when `SSL_CERT_FILE` does not say.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// TLS sessions remembered per map for resumption (one per server is plenty).
const SESSION_CACHE_ENTRIES: usize = 256;

/// The `tls_*` settings as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A loaded TLS client: the rustls configuration (shared by every
/// connection of the map, on every worker) and the name to verify.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    /// `tls_server_name`, verified and sent as SNI instead of the URL's host.
    pub server_name: Option<ServerName<'static>>,
    /// A hash of every input (file contents included): equal fingerprints
    /// mean the same trust and identity.
    pub fingerprint: u64,
}

impl TlsClient {
    /// The name verified (and sent as SNI) for a server whose URL names
    /// `host`: `tls_server_name` when set, else `host` (an IP address is
    /// verified as one; a host that is no valid name cannot verify).
    pub fn name_for(&self, host: &str) -> ServerName<'static> {
        self.server_name.clone().unwrap_or_else(|| {
            ServerName::try_from(host.to_string())
                .unwrap_or_else(|_| ServerName::try_from("invalid.").expect("a valid name"))
        })
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        write!(f, "TlsClient({:016x})", self.fingerprint)
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// Which setting a problem is about (so the caller reports it on that line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    CaFile,
    ServerName,
    ClientCert,
    ClientKey,
}

/// The trust file in force: `ca_file`, else `SSL_CERT_FILE`, else Debian's.
pub fn trust_file(ca_file: Option<&Path>) -> PathBuf {
    ca_file.map(Path::to_path_buf).unwrap_or_else(|| {
        std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE))
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Loads and checks everything `s` names into a client.
pub fn load(s: &TlsSettings) -> Result<TlsClient, (Setting, String)> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let ca_path = trust_file(s.ca_file.as_deref());
    let ca_pem = read(&ca_path).map_err(|e| (Setting::CaFile, e))?;
    ca_pem.hash(&mut h);
    let mut roots = RootCertStore::empty();
    let mut bad = 0;
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        match c {
            Ok(der) => {
                if roots.add(der).is_err() {
                    bad += 1;
                }
            }
            Err(e) => {
                return Err((
                    Setting::CaFile,
                    format!("{}: not a PEM certificate bundle: {e}", ca_path.display()),
                ))
            }
        }
    }
    if roots.is_empty() {
        return Err((
            Setting::CaFile,
            format!(
                "{}: no usable CA certificate in it{}",
                ca_path.display(),
                if bad > 0 { " (all invalid)" } else { "" }
            ),
        ));
    }
    let server_name = match &s.server_name {
        None => None,
        Some(n) => {
            n.hash(&mut h);
            Some(ServerName::try_from(n.clone()).map_err(|_| {
                (
                    Setting::ServerName,
                    format!("{n:?} is not a host name or IP address"),
                )
            })?)
        }
    };
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| (Setting::CaFile, format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
    let mut config = match (&s.client_cert, &s.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err((
                Setting::ClientCert,
                "tls_client_cert needs tls_client_key".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                Setting::ClientKey,
                "tls_client_key needs tls_client_cert".into(),
            ))
        }
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = read(cert_path).map_err(|e| (Setting::ClientCert, e))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    (
                        Setting::ClientCert,
                        format!("{}: not a PEM certificate: {e}", cert_path.display()),
                    )
                })?;
            if chain.is_empty() {
                return Err((
                    Setting::ClientCert,
                    format!("{}: no certificate in it", cert_path.display()),
                ));
            }
            let key_pem = read(key_path).map_err(|e| (Setting::ClientKey, e))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                (
                    Setting::ClientKey,
                    format!("{}: not a PEM private key: {e}", key_path.display()),
                )
            })?;
            cert_pem.hash(&mut h);
            key_pem.hash(&mut h);
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                (
                    Setting::ClientKey,
                    format!(
                        "{} and {} do not make a client identity: {e}",
                        cert_path.display(),
                        key_path.display()
                    ),
                )
            })?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE_ENTRIES);
    Ok(TlsClient {
        config: Arc::new(config),
        server_name,
        fingerprint: h.finish(),
    })
}

/// An IO error of a connection verifying `name`, in words: a TLS failure
/// as [`describe`] says it, anything else as it is.
pub fn io_text(e: &std::io::Error, name: &ServerName<'_>) -> String {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map_or_else(|| e.to_string(), |t| describe(t, name))
}

/// A TLS failure in an operator's words (for the "server is down" line).
pub fn describe(e: &rustls::Error, name: &ServerName<'_>) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let name = name.to_str();
    match e {
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate not yet valid".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("name mismatch: wanted {name}")
            }
            C::UnknownIssuer => {
                "unknown CA: the certificate is not signed by a trusted authority (tls_ca_file)"
                    .into()
            }
            C::BadSignature => "bad certificate signature".into(),
            C::Revoked => "certificate revoked".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "certificate not valid for a TLS server".into()
            }
            other => format!("invalid certificate: {other:?}"),
        },
        E::AlertReceived(A::CertificateRequired) => {
            "the server requires a client certificate (tls_client_cert)".into()
        }
        E::AlertReceived(A::UnknownCA) | E::AlertReceived(A::BadCertificate) => {
            "the server refused our client certificate".into()
        }
        E::AlertReceived(a) => format!("the server sent TLS alert {a:?}"),
        E::InvalidMessage(m) => format!("not TLS (a plain HTTP server on a TLS port?): {m:?}"),
        E::NoCertificatesPresented => "the server presented no certificate".into(),
        E::PeerIncompatible(p) => format!("no TLS version or cipher in common: {p:?}"),
        other => format!("TLS: {other}"),
    }
}
