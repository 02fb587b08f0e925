//! A certificate authority for the servers of a test. Prosody and coturn can share one, so that
//! one CA file (ipop's `[xmpp] ca_file`) makes a device trust both.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// `id-on-xmppAddr` (RFC 6120 §13.7.1.4): the otherName that carries a JID in a certificate.
const ID_ON_XMPP_ADDR: [u64; 9] = [1, 3, 6, 1, 5, 5, 7, 8, 5];

/// A fresh CA; clones share it.
#[derive(Clone)]
pub struct TestCa {
    issuer: Arc<CertifiedIssuer<'static, KeyPair>>,
    name: Arc<str>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A server certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct ServerCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A CA whose certificate has the common name `name`.
    ///
    /// # Panics
    /// When a key cannot be generated or the certificate cannot be signed.
    #[must_use]
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a CA key: {e}"));
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        set_validity(&mut params);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, key)
            .unwrap_or_else(|e| panic!("cannot sign the test CA: {e}"));
        TestCa {
            issuer: Arc::new(issuer),
            name: name.into(),
        }
    }

    /// The CA certificate, PEM-encoded.
    #[must_use]
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER-encoded.
    #[must_use]
    pub fn der(&self) -> &[u8] {
        self.issuer.der()
    }

    /// A server certificate for the host names `names` (a leaf: CA:FALSE, serverAuth), the
    /// first of them also its common name, signed by this CA.
    ///
    /// # Panics
    /// When `names` is empty or holds a name that cannot be in a certificate.
    #[must_use]
    pub fn issue(&self, names: &[&str]) -> ServerCertificate {
        let first = names
            .first()
            .expect("a certificate names at least one host");
        let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(owned)
            .unwrap_or_else(|e| panic!("cannot make a certificate for {names:?}: {e}"));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, *first);
        params.is_ca = IsCa::ExplicitNoCa;
        set_validity(&mut params);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key =
            KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a server key: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("cannot sign the certificate for {names:?}: {e}"));
        ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate for the XMPP account `jid` (a leaf: CA:FALSE, clientAuth), with the
    /// JID as its common name and as an `id-on-xmppAddr` subject alternative name, as servers
    /// read it for SASL EXTERNAL (XEP-0178).
    ///
    /// # Panics
    /// When the certificate cannot be made.
    #[must_use]
    pub fn issue_client(&self, jid: &str) -> ServerCertificate {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, jid);
        params.subject_alt_names = vec![SanType::OtherName((
            ID_ON_XMPP_ADDR.to_vec(),
            jid.to_owned().into(),
        ))];
        params.is_ca = IsCa::ExplicitNoCa;
        set_validity(&mut params);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key =
            KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a client key: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("cannot sign the certificate for {jid}: {e}"));
        ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes into `dir` this CA as `ca.crt`, and a server certificate for `names` (see
    /// [`TestCa::issue`]) as `server.crt` and `server.key`.
    ///
    /// # Panics
    /// When a file cannot be written.
    pub fn write_server_files(&self, dir: &Path, names: &[&str]) {
        let server = self.issue(names);
        for (file, contents) in [
            ("ca.crt", self.pem()),
            ("server.crt", server.cert_pem),
            ("server.key", server.key_pem),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }
}

/// Valid from 2000 to 2100. rcgen's default runs to the year 4096, and ejabberd fails to load
/// such a certificate: the timer it sets for the expiry warning is out of the Erlang VM's range.
fn set_validity(params: &mut CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaf_certificates_for_the_names_given() {
        let ca = TestCa::new("ipop-lab test CA");
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.der().is_empty());
        let server = ca.issue(&["turn.example.org", "relay.example.org"]);
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.contains("PRIVATE KEY"));
        let shared = ca.clone();
        assert_eq!(shared.der(), ca.der(), "clones are the same CA");
    }
}
