//! Untrusted input of the certificate service: the protobuf request (CSR PEM, lifetime, metadata
//! with ImpersonatedIdentity) and raw CSR DER. Nothing may panic; an accepted CSR always names
//! exactly one valid SPIFFE ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::api::istio::v1::auth::IstioCertificateRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = IstioCertificateRequest::decode(data) {
        let _ = ca::grpc::impersonated_identity(request.metadata.as_ref());
        if let Ok(checked) = ca::authority::csr::check(&request.csr) {
            assert!(checked.identity.as_str().starts_with("spiffe://"));
        }
    }
    if let Ok(checked) = ca::authority::csr::check_der(data) {
        assert!(checked.identity.as_str().starts_with("spiffe://"));
    }
});
