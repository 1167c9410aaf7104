//! Generated protobuf types and gRPC stubs.
//!
//! Modules mirror the protobuf packages so generated cross-package paths resolve; each package is
//! wire-identical to its public counterpart (see `proto/*.proto`). These are wire types only: the
//! components convert them into their own domain types at the edge.

#![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// Istio APIs.
pub mod istio {
    /// `istio.workload`: workloads and services as ztunnel sees them.
    pub mod workload {
        tonic::include_proto!("istio.workload");

        /// `istio.workload.zds`: node enrollment between the node agent and ztunnel.
        pub mod zds {
            tonic::include_proto!("istio.workload.zds");
        }
    }
    /// `istio.security`: L4 authorization policies for ztunnel.
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    /// `istio.v1.auth`: the certificate signing service.
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// Our own APIs.
pub mod ambient {
    pub mod ca {
        /// `ambient.ca.v1`: the trust bundle resource and the CA's admin service.
        pub mod v1 {
            tonic::include_proto!("ambient.ca.v1");
        }
    }
    pub mod waypoint {
        /// `ambient.waypoint.v1`: routes and L7 policy for waypoints.
        pub mod v1 {
            tonic::include_proto!("ambient.waypoint.v1");
        }
    }
}

/// Envoy APIs.
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            /// `envoy.service.discovery.v3`: (delta) aggregated discovery.
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// Google APIs used on the wire.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// xDS type URLs of the resources the control plane serves.
pub mod type_url {
    /// A workload or a service (`istio.workload.Address`).
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    /// An L4 authorization policy (`istio.security.Authorization`).
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    /// The routes for traffic to one service (`ambient.waypoint.v1.ServiceRoutes`).
    pub const SERVICE_ROUTES: &str = "type.googleapis.com/ambient.waypoint.v1.ServiceRoutes";
    /// An L7 authorization policy for waypoints (`ambient.waypoint.v1.L7Policy`).
    pub const L7_POLICY: &str = "type.googleapis.com/ambient.waypoint.v1.L7Policy";
    /// A RequestAuthentication for waypoints (`ambient.waypoint.v1.RequestAuthn`).
    pub const REQUEST_AUTHN: &str = "type.googleapis.com/ambient.waypoint.v1.RequestAuthn";
    /// A DestinationRule's traffic policy for waypoints (`ambient.waypoint.v1.DestinationPolicy`).
    pub const DESTINATION_POLICY: &str = "type.googleapis.com/ambient.waypoint.v1.DestinationPolicy";
    /// An ingress gateway's servers and bound routes (`ambient.waypoint.v1.IngressGateway`).
    pub const INGRESS_GATEWAY: &str = "type.googleapis.com/ambient.waypoint.v1.IngressGateway";
    /// A certificate an ingress gateway terminates TLS with (`ambient.waypoint.v1.GatewayCredential`).
    pub const GATEWAY_CREDENTIAL: &str = "type.googleapis.com/ambient.waypoint.v1.GatewayCredential";
    /// Telemetry settings of one scope for waypoints and gateways (`ambient.waypoint.v1.Telemetry`).
    pub const TELEMETRY: &str = "type.googleapis.com/ambient.waypoint.v1.Telemetry";
    /// Mesh-wide settings for the node proxies (`ambient.waypoint.v1.MeshSettings`), one
    /// resource named [`MESH_SETTINGS_NAME`](super::MESH_SETTINGS_NAME).
    pub const MESH_SETTINGS: &str = "type.googleapis.com/ambient.waypoint.v1.MeshSettings";
    /// The roots proxies trust (`ambient.ca.v1.TrustBundle`), one resource named
    /// [`TRUST_BUNDLE_NAME`](super::TRUST_BUNDLE_NAME).
    pub const TRUST_BUNDLE: &str = "type.googleapis.com/ambient.ca.v1.TrustBundle";
}

/// Name of the single trust-bundle resource.
pub const TRUST_BUNDLE_NAME: &str = "trust-bundle";

/// Name of the single mesh-settings resource.
pub const MESH_SETTINGS_NAME: &str = "mesh";
