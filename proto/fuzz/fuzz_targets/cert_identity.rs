//! Extracting the SPIFFE ID from peer certificate bytes (arbitrary DER): never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let der = rustls_pki_types::CertificateDer::from(data);
    let _ = proto::tls::spiffe_id_from_cert(&der);
});
