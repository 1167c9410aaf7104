//! Test helpers (feature `testing`): a throwaway CA that issues real X.509-SVIDs,
//! [`eventually`], the one way tests wait for a condition, and [`xds_resource`] for delta xDS
//! responses built by hand.
//!
//! Tests across the workspace use it to get real certificate chains without the `ca` component.
//! It follows the SVID profile of DESIGN.md (one URI SAN, `CA:false`, serverAuth + clientAuth,
//! ECDSA P-256), and can also mint deliberately wrong certificates for negative tests.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::SpiffeId;
use crate::tls::{Credential, SharedTrustBundle, TrustBundle, WorkloadCert};

/// A delta xDS resource of `type_url` named `name` (version `v1`) carrying the encoded `value`.
pub fn xds_resource(name: &str, type_url: &str, value: Vec<u8>) -> crate::api::envoy::service::discovery::v3::Resource {
    crate::api::envoy::service::discovery::v3::Resource {
        name: name.into(),
        version: "v1".into(),
        resource: Some(prost_types::Any { type_url: type_url.into(), value }),
        ..Default::default()
    }
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// Validity window of an issued certificate, as calendar years (rcgen's date helpers).
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// Valid now and for decades.
    Current,
    /// Expired long ago.
    Expired,
    /// Valid only in the far future.
    NotYetValid,
}

/// A root CA and an intermediate that signs leaves.
pub struct TestCa {
    root_der: CertificateDer<'static>,
    root_pem: String,
    intermediate_der: CertificateDer<'static>,
    intermediate: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut dn = DistinguishedName::new();
    // Unique names, so chains of two test CAs never look like each other's issuers.
    dn.push(DnType::CommonName, format!("{common_name} {serial}"));
    dn.push(DnType::OrganizationName, "mesh test");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2090, 1, 1);
    params.serial_number = Some(SerialNumber::from(serial));
    params
}

impl TestCa {
    /// A fresh root and intermediate.
    pub fn new() -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("test root");
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let (root_der, root_pem) = (root_cert.der().clone(), root_cert.pem());
        let root = Issuer::new(root_params, root_key);

        let int_key = KeyPair::generate().unwrap();
        let int_params = ca_params("test intermediate");
        let intermediate_der = int_params.signed_by(&int_key, &root).unwrap().der().clone();
        TestCa { root_der, root_pem, intermediate_der, intermediate: Issuer::new(int_params, int_key) }
    }

    /// The root, as a trust bundle.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(vec![self.root_der.clone()]).unwrap()
    }

    /// The root, as a swappable trust bundle.
    pub fn shared_bundle(&self) -> Arc<SharedTrustBundle> {
        SharedTrustBundle::new(self.bundle())
    }

    /// The root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A valid SVID for `id`.
    pub fn issue(&self, id: &SpiffeId) -> WorkloadCert {
        self.issue_with(&[id.as_str()], Validity::Current)
    }

    /// A valid SVID for `id`, wrapped as a swappable credential.
    pub fn credential(&self, id: &str) -> Arc<Credential> {
        Credential::new(self.issue(&id.parse().unwrap()))
    }

    /// A leaf with the given URI SANs and validity; chain is leaf → intermediate (root omitted, as
    /// peers have it in their bundle).
    pub fn issue_with(&self, uris: &[&str], validity: Validity) -> WorkloadCert {
        let (chain, key) = self.issue_raw(uris, validity);
        WorkloadCert::from_der(chain, key).unwrap()
    }

    /// Like [`issue_with`](Self::issue_with), but returns the raw DER so tests can build
    /// certificates [`WorkloadCert`] itself would refuse.
    pub fn issue_raw(
        &self,
        uris: &[&str],
        validity: Validity,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(SERIAL.fetch_add(1, Ordering::Relaxed)));
        let (nb, na) = match validity {
            Validity::Current => ((2020, 1, 1), (2090, 1, 1)),
            Validity::Expired => ((2001, 1, 1), (2002, 1, 1)),
            Validity::NotYetValid => ((2095, 1, 1), (2099, 1, 1)),
        };
        params.not_before = rcgen::date_time_ymd(nb.0, nb.1, nb.2);
        params.not_after = rcgen::date_time_ymd(na.0, na.1, na.2);
        let leaf = params.signed_by(&key, &self.intermediate).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![leaf.der().clone(), self.intermediate_der.clone()], key_der)
    }
}

impl TestCa {
    /// A TLS server certificate for `names` (IP addresses or DNS names), chained to the
    /// intermediate.
    pub fn issue_server(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(SERIAL.fetch_add(1, Ordering::Relaxed)));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2090, 1, 1);
        let leaf = params.signed_by(&key, &self.intermediate).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![leaf.der().clone(), self.intermediate_der.clone()], key_der)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// How often [`poll`] looks again: soon at first, then at most every 100 ms.
fn next_poll(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_millis(5), Duration::from_millis(100))
}

/// Waits for a condition instead of sleeping for a guessed time: polls `check` (soon at first,
/// then every 100 ms at most) until it gives `Some`, and returns that value; `None` once `within`
/// has passed.
pub async fn poll<T, Fut>(within: Duration, mut check: impl FnMut() -> Fut) -> Option<T>
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::ZERO;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        pause = next_poll(pause);
        tokio::time::sleep(pause).await;
    }
}

/// [`poll`] that panics naming `what` at the deadline, so a test fails with the condition it
/// waited for.
#[allow(clippy::panic, reason = "failing the test is what it is for")]
pub async fn eventually<T, Fut>(what: &str, within: Duration, check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    poll(within, check).await.unwrap_or_else(|| panic!("waited {within:?} for {what}, in vain"))
}

/// [`eventually`] for code outside an async runtime (blocks the thread between checks).
pub fn eventually_blocking<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    let mut pause = Duration::ZERO;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "waited {within:?} for {what}, in vain");
        pause = next_poll(pause);
        std::thread::sleep(pause);
    }
}
