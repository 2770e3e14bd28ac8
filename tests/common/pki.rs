//! A test PKI made with rcgen: certificate authorities ([`Ca`]), server and
//! client certificates they issue ([`Leaf`]: valid, expired or not yet
//! valid, for DNS names or IP addresses), written as PEM files into a
//! directory removed when dropped ([`TempDir`], [`write_leaf`]).
//!
//! Used by the HTTPS tests (`tests/tls.rs`: nginx with TLS) and the shared
//! cache's TLS tests (`tests/shared_cache.rs`: redis-server with TLS).

use super::unique_temp_dir;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::PathBuf;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory (see [`unique_temp_dir`]).
    pub fn new(prefix: &str) -> TempDir {
        TempDir(unique_temp_dir(prefix))
    }

    /// Writes `name` in the directory; returns its path.
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// The path of `name` in the directory (which may not exist).
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate's validity period (fixed dates; the tests run between them).
#[derive(Clone, Copy)]
pub enum Validity {
    /// 2020 to 2110.
    Valid,
    /// 2001 to 2002.
    Expired,
    /// 2100 to 2110.
    NotYetValid,
}

/// A certificate authority made for the test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its (self-signed) certificate, PEM: what a `tls_ca_file` holds.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// The distinguished name `CN=cn`.
pub fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}

impl Ca {
    /// A new CA with subject `CN=cn` and a fresh key, valid 2020 to 2120.
    pub fn new(cn: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = dn(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2120, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) with subject
    /// CN=`cn`, for a TLS server or (`client`) a TLS client.
    pub fn issue(&self, names: &[&str], cn: &str, validity: Validity, client: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name = dn(cn);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        (p.not_before, p.not_after) = match validity {
            Validity::Valid => (date_time_ymd(2020, 1, 1), date_time_ymd(2110, 1, 1)),
            Validity::Expired => (date_time_ymd(2001, 1, 1), date_time_ymd(2002, 1, 1)),
            Validity::NotYetValid => (date_time_ymd(2100, 1, 1), date_time_ymd(2110, 1, 1)),
        };
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A valid server certificate for `names`, CN the first of them.
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.issue(names, names[0], Validity::Valid, false)
    }

    /// A valid client certificate with subject CN=`cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.issue(&[], cn, Validity::Valid, true)
    }
}

/// Writes `leaf` as NAME.crt and NAME.key in `dir`: (cert path, key path).
pub fn write_leaf(dir: &TempDir, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    (
        dir.write(&format!("{name}.crt"), &leaf.cert),
        dir.write(&format!("{name}.key"), &leaf.key),
    )
}
