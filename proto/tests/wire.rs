//! Wire compatibility of the generated protobuf types with the public definitions: exact bytes for
//! hand-encoded messages (field numbers and wire types), unknown fields tolerated, the gRPC paths
//! Istio's clients call, and a real gRPC round trip through the generated stubs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use prost::Message;
use proto::api::envoy::service::discovery::v3 as xds;
use proto::api::istio::security as authz;
use proto::api::istio::v1::auth as ca;
use proto::api::istio::workload as wl;
use proto::api::istio::workload::zds;

/// Encodes a protobuf varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field, built by hand from its field number.
fn len_field(field: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3 | 2, &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

fn varint_field(field: u64, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(field << 3, &mut out);
    varint(value, &mut out);
    out
}

#[test]
fn citadel_request_and_response_use_istios_field_numbers() {
    let req = ca::IstioCertificateRequest { csr: "CSR".into(), validity_duration: 3600, metadata: None };
    let expected = [len_field(1, b"CSR"), varint_field(3, 3600)].concat();
    assert_eq!(req.encode_to_vec(), expected);

    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("spiffe://cluster.local/ns/a/sa/b".into())),
            },
        )]
        .into(),
    };
    let req = ca::IstioCertificateRequest { metadata: Some(metadata.clone()), ..Default::default() };
    assert_eq!(req.encode_to_vec(), len_field(4, &metadata.encode_to_vec()));

    let resp = ca::IstioCertificateResponse { cert_chain: vec!["leaf".into(), "root".into()] };
    assert_eq!(resp.encode_to_vec(), [len_field(1, b"leaf"), len_field(1, b"root")].concat());
}

#[test]
fn grpc_paths_match_istio_and_envoy() {
    assert_eq!(ca::istio_certificate_service_server::SERVICE_NAME, "istio.v1.auth.IstioCertificateService");
    assert_eq!(
        xds::aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}

#[test]
fn delta_discovery_messages_use_envoys_field_numbers() {
    let req = xds::DeltaDiscoveryRequest {
        node: Some(proto::api::envoy::config::core::v3::Node { id: "n".into(), ..Default::default() }),
        type_url: "t".into(),
        resource_names_subscribe: vec!["s".into()],
        resource_names_unsubscribe: vec!["u".into()],
        initial_resource_versions: [("r".to_owned(), "v".to_owned())].into(),
        response_nonce: "x".into(),
        error_detail: Some(proto::api::google::rpc::Status { code: 3, message: "m".into(), details: vec![] }),
    };
    let map_entry = [len_field(1, b"r"), len_field(2, b"v")].concat();
    let status = [varint_field(1, 3), len_field(2, b"m")].concat();
    let expected = [
        len_field(1, &len_field(1, b"n")),
        len_field(2, b"t"),
        len_field(3, b"s"),
        len_field(4, b"u"),
        len_field(5, &map_entry),
        len_field(6, b"x"),
        len_field(7, &status),
    ]
    .concat();
    assert_eq!(req.encode_to_vec(), expected);

    let any = prost_types::Any { type_url: "t".into(), value: b"v".to_vec() };
    let resp = xds::DeltaDiscoveryResponse {
        system_version_info: "sv".into(),
        resources: vec![xds::Resource {
            version: "1".into(),
            resource: Some(any.clone()),
            name: "n".into(),
            aliases: vec!["a".into()],
            ttl: None,
            cache_control: None,
        }],
        type_url: "t".into(),
        nonce: "x".into(),
        removed_resources: vec!["gone".into()],
    };
    let resource =
        [len_field(1, b"1"), len_field(2, &any.encode_to_vec()), len_field(3, b"n"), len_field(4, b"a")].concat();
    let expected =
        [len_field(1, b"sv"), len_field(2, &resource), len_field(4, b"t"), len_field(5, b"x"), len_field(6, b"gone")]
            .concat();
    assert_eq!(resp.encode_to_vec(), expected);
}

#[test]
fn workload_and_service_use_istios_field_numbers() {
    let w = wl::Workload {
        uid: "uid".into(),
        name: "pod".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        trust_domain: "td".into(),
        service_account: "sa".into(),
        node: "node1".into(),
        services: [(
            "ns/svc.ns.svc.cluster.local".to_owned(),
            wl::PortList { ports: vec![wl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }] },
        )]
        .into(),
        authorization_policies: vec!["ns/p".into()],
        waypoint: Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(wl::NetworkAddress {
                length: None,
                network: String::new(),
                address: vec![10, 0, 0, 9],
            })),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    let port = [varint_field(1, 80), varint_field(2, 8080)].concat();
    let port_list = len_field(1, &port);
    let services_entry = [len_field(1, b"ns/svc.ns.svc.cluster.local"), len_field(2, &port_list)].concat();
    let waypoint = [len_field(2, &len_field(2, &[10, 0, 0, 9])), varint_field(3, 15008)].concat();
    // prost writes fields in field-number order.
    let expected = [
        len_field(1, b"pod"),
        len_field(2, b"ns"),
        len_field(3, &[10, 0, 0, 1]),
        varint_field(5, 1),
        len_field(6, b"td"),
        len_field(7, b"sa"),
        len_field(8, &waypoint),
        len_field(9, b"node1"),
        len_field(16, b"ns/p"),
        len_field(20, b"uid"),
        len_field(22, &services_entry),
    ]
    .concat();
    assert_eq!(w.encode_to_vec(), expected);

    let addr = wl::Address { r#type: Some(wl::address::Type::Workload(w.clone())) };
    assert_eq!(addr.encode_to_vec(), len_field(1, &expected));

    let svc = wl::Service {
        name: "svc".into(),
        namespace: "ns".into(),
        hostname: "svc.ns.svc.cluster.local".into(),
        addresses: vec![wl::NetworkAddress { network: String::new(), address: vec![10, 96, 0, 1], length: None }],
        ports: vec![wl::Port { service_port: 80, target_port: 0, app_protocol: 0 }],
        ..Default::default()
    };
    let expected_svc = [
        len_field(1, b"svc"),
        len_field(2, b"ns"),
        len_field(3, b"svc.ns.svc.cluster.local"),
        len_field(4, &len_field(2, &[10, 96, 0, 1])),
        len_field(5, &varint_field(1, 80)),
    ]
    .concat();
    assert_eq!(svc.encode_to_vec(), expected_svc);
    let addr = wl::Address { r#type: Some(wl::address::Type::Service(svc)) };
    assert_eq!(addr.encode_to_vec(), len_field(2, &expected_svc));
}

#[test]
fn authorization_uses_istios_field_numbers() {
    let policy = authz::Authorization {
        name: "deny-all".into(),
        namespace: "ns".into(),
        scope: authz::Scope::Namespace as i32,
        action: authz::Action::Deny as i32,
        rules: vec![authz::Rule {
            clauses: vec![authz::Clause {
                matches: vec![authz::Match {
                    principals: vec![authz::StringMatch {
                        match_type: Some(authz::string_match::MatchType::Exact("spiffe://td/ns/a/sa/b".into())),
                    }],
                    not_source_ips: vec![authz::Address { address: vec![10, 0, 0, 0], length: 8 }],
                    destination_ports: vec![80],
                    service_accounts: vec![authz::ServiceAccountMatch {
                        namespace: "a".into(),
                        service_account: "b".into(),
                    }],
                    not_service_accounts: vec![authz::ServiceAccountMatch {
                        namespace: "c".into(),
                        service_account: "d".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: true,
        extensions: vec![],
    };
    let principal = len_field(3, &len_field(1, b"spiffe://td/ns/a/sa/b"));
    let not_ip = len_field(6, &[len_field(1, &[10, 0, 0, 0]), varint_field(2, 8)].concat());
    // Packed repeated uint32.
    let ports = len_field(9, &[80]);
    // ServiceAccountMatch{namespace = 1, serviceAccount = 2}.
    let account = len_field(11, &[len_field(1, b"a"), len_field(2, b"b")].concat());
    let not_account = len_field(12, &[len_field(1, b"c"), len_field(2, b"d")].concat());
    let matched = [principal, not_ip, ports, account, not_account].concat();
    let rule = len_field(1, &len_field(2, &matched));
    let expected = [
        len_field(1, b"deny-all"),
        len_field(2, b"ns"),
        varint_field(3, 1),
        varint_field(4, 1),
        len_field(5, &rule),
        varint_field(6, 1),
    ]
    .concat();
    assert_eq!(policy.encode_to_vec(), expected);
}

#[test]
fn zds_messages_use_istios_field_numbers() {
    let hello = zds::ZdsHello { version: zds::Version::V1 as i32 };
    assert_eq!(hello.encode_to_vec(), varint_field(1, 1));

    let add = zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: "u".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "p".into(),
                namespace: "n".into(),
                service_account: "s".into(),
            }),
        })),
    };
    let info = [len_field(1, b"p"), len_field(2, b"n"), len_field(3, b"s")].concat();
    assert_eq!(add.encode_to_vec(), len_field(1, &[len_field(1, b"u"), len_field(2, &info)].concat()));

    let del = zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload { uid: "u".into() })),
    };
    assert_eq!(del.encode_to_vec(), len_field(2, &len_field(2, b"u")));
    let snap =
        zds::WorkloadRequest { payload: Some(zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {})) };
    assert_eq!(snap.encode_to_vec(), len_field(3, &[]));
    let keep = zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload { uid: "u".into() })),
    };
    assert_eq!(keep.encode_to_vec(), len_field(5, &len_field(1, b"u")));
    let ack =
        zds::WorkloadResponse { payload: Some(zds::workload_response::Payload::Ack(zds::Ack { error: "e".into() })) };
    assert_eq!(ack.encode_to_vec(), len_field(1, &len_field(1, b"e")));
}

#[test]
fn unknown_fields_decode_fine() {
    // A newer Workload with fields we do not model (numbers 99 and 100, varint and bytes).
    let bytes = [len_field(20, b"uid"), varint_field(99, 7), len_field(100, b"future"), len_field(1, b"pod")].concat();
    let w = wl::Workload::decode(bytes.as_slice()).unwrap();
    assert_eq!(w.uid, "uid");
    assert_eq!(w.name, "pod");
    let bytes = [len_field(1, b"n"), varint_field(42, 1)].concat();
    assert_eq!(authz::Authorization::decode(bytes.as_slice()).unwrap().name, "n");
}

#[test]
fn truncated_and_garbage_bytes_are_errors_not_panics() {
    let good = wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload { uid: "u".into(), ..Default::default() })),
    }
    .encode_to_vec();
    for cut in 1..good.len() {
        assert!(wl::Address::decode(&good[..cut]).is_err(), "truncated at {cut} decoded");
    }
    for garbage in [&[0xffu8; 16][..], &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], &[0x07]] {
        assert!(wl::Address::decode(garbage).is_err());
        assert!(zds::WorkloadRequest::decode(garbage).is_err());
    }
}

mod grpc {
    use super::ca;
    use ca::istio_certificate_service_client::IstioCertificateServiceClient;
    use ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
    use tonic::{Request, Response, Status};

    /// Answers with the CSR and the requested TTL, so the test sees both fields cross the wire.
    struct Echo;

    #[tonic::async_trait]
    impl IstioCertificateService for Echo {
        async fn create_certificate(
            &self,
            request: Request<ca::IstioCertificateRequest>,
        ) -> Result<Response<ca::IstioCertificateResponse>, Status> {
            let r = request.into_inner();
            if r.csr.is_empty() {
                return Err(Status::invalid_argument("empty CSR"));
            }
            Ok(Response::new(ca::IstioCertificateResponse { cert_chain: vec![r.csr, r.validity_duration.to_string()] }))
        }
    }

    #[tokio::test]
    async fn generated_stubs_round_trip_over_grpc() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IstioCertificateServiceServer::new(Echo))
                .serve_with_incoming(incoming),
        );
        let mut client = IstioCertificateServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let resp = client
            .create_certificate(ca::IstioCertificateRequest {
                csr: "pem".into(),
                validity_duration: 60,
                metadata: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.cert_chain, vec!["pem".to_owned(), "60".to_owned()]);
        let err = client.create_certificate(ca::IstioCertificateRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
