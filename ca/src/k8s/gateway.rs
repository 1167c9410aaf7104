//! Gateway API kinds (gateway.networking.k8s.io/v1): `Gateway`, `HTTPRoute`, `GRPCRoute`.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::validate::Invalid;

/// Gateway API `Gateway` (gateway.networking.k8s.io/v1). Waypoints are Gateways of class
/// `istio-waypoint`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "Gateway", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The class; `istio-waypoint` for waypoints.
    pub gateway_class_name: String,
    /// Listeners; a waypoint has an HBONE listener on 15008.
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

/// One listener of a Gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    /// Listener name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol, `HBONE` for waypoints; `HTTP`, `HTTPS`, `TLS`, `TCP` for gateways.
    pub protocol: String,
    /// The host it serves (a name or `*.<domain>`); none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// TLS settings of an HTTPS or TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Which routes may attach to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// A listener's TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// `Terminate` (the default) or `Passthrough`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The Secrets holding its certificate (the first is used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_refs: Vec<ObjectRef>,
}

/// Which routes may attach to a listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    /// From which namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<RouteNamespaces>,
}

/// `allowedRoutes.namespaces`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For `Selector`: the namespaces' labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// A reference to a parent (Gateway or Service) or a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// API group; empty for core (Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind; `Gateway` for parents, `Service` for backends by default.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; defaults to the referring object's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port (for Service parents and backends).
    #[serde(default)]
    pub port: Option<u16>,
    /// Listener name (for Gateway parents).
    #[serde(default)]
    pub section_name: Option<String>,
}

/// Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "HTTPRoute", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    /// A Service (GAMMA: the route applies to traffic to it) or a waypoint Gateway.
    #[serde(default)]
    pub parent_refs: Vec<ObjectRef>,
    /// Hostnames the route matches (for Gateway parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, tried in order of match precedence.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// Gateway API `GRPCRoute` (gateway.networking.k8s.io/v1): routes gRPC calls by service and
/// method. Translated as the HTTPRoute it amounts to ([`GRPCRouteSpec::as_http`]): a gRPC call is
/// an HTTP/2 POST to `/<service>/<method>`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "GRPCRoute", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    /// A Service (GAMMA) or a waypoint Gateway.
    #[serde(default)]
    pub parent_refs: Vec<ObjectRef>,
    /// Hostnames (for Gateway parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; an empty list matches every call.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters (header modifiers, mirror).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// A call match: method and headers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// Service and/or method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) matches.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
}

/// `Exact` (default) or `RegularExpression` on the fully qualified service and the method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `SayHello`.
    #[serde(default)]
    pub method: Option<String>,
}

impl GRPCRouteSpec {
    /// The HTTPRoute this route amounts to: a method match becomes a path match on
    /// `/<service>/<method>` (exact when both are given, a prefix `/<service>/` for a service alone,
    /// a regular expression otherwise).
    pub fn as_http(&self) -> Result<HTTPRouteSpec, Invalid> {
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let matches = r
                    .matches
                    .iter()
                    .map(|m| {
                        let path = m.method.as_ref().map(GrpcMethodMatch::as_path).transpose()?;
                        Ok(HttpRouteMatch { path, headers: m.headers.clone(), ..Default::default() })
                    })
                    .collect::<Result<Vec<_>, Invalid>>()?;
                Ok(HttpRouteRule {
                    name: r.name.clone(),
                    matches,
                    filters: r.filters.clone(),
                    backend_refs: r.backend_refs.clone(),
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        Ok(HTTPRouteSpec { parent_refs: self.parent_refs.clone(), hostnames: self.hostnames.clone(), rules })
    }
}

impl GrpcMethodMatch {
    fn as_path(&self) -> Result<HttpPathMatch, Invalid> {
        let (service, method) = (self.service.as_deref(), self.method.as_deref());
        let path = |kind: &str, value: String| HttpPathMatch { kind: Some(kind.into()), value: Some(value) };
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        match self.kind.as_deref() {
            None | Some("Exact") => {
                for part in [service, method].into_iter().flatten() {
                    if !valid(part) {
                        return Err(Invalid(format!("gRPC method match {part:?} is empty or contains '/'")));
                    }
                }
                match (service, method) {
                    (Some(s), Some(m)) => Ok(path("Exact", format!("/{s}/{m}"))),
                    (Some(s), None) => Ok(path("PathPrefix", format!("/{s}"))),
                    (None, Some(m)) => Ok(path("RegularExpression", format!("/[^/]+/{}", regex_syntax::escape(m)))),
                    (None, None) => Err(Invalid("a gRPC method match needs a service or a method".to_owned())),
                }
            }
            Some("RegularExpression") => {
                let s = service.unwrap_or("[^/]+");
                let m = method.unwrap_or("[^/]+");
                Ok(path("RegularExpression", format!("/({s})/({m})")))
            }
            Some(other) => Err(Invalid(format!("gRPC method match type {other:?} is not Exact or RegularExpression"))),
        }
    }
}

/// One HTTPRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; an empty list matches every request (prefix `/`).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to matching requests.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (Gateway API experimental `retry`).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// A request match: all set fields must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match.
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// Path match: `Exact`, `PathPrefix` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Value; defaults to `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// Header or query-parameter match: `Exact` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpValueMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Header or parameter name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// HTTPRoute filter (the core and extended kinds a waypoint implements).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`, `RequestMirror`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<serde_json::Value>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<serde_json::Value>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<serde_json::Value>,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers to set (replace).
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Headers to add (append).
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A weighted backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// The backend (a Service by default).
    #[serde(flatten)]
    pub target: ObjectRef,
    /// Relative weight; defaults to 1.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// Timeouts, as Gateway API durations (`10s`, `500ms`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, including retries.
    #[serde(default)]
    pub request: Option<String>,
    /// Each attempt to a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Retry policy (Gateway API GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Status codes that are retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Maximum attempts after the first.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Base backoff, a duration.
    #[serde(default)]
    pub backoff: Option<String>,
}

#[cfg(test)]
mod grpc_route_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn path_of(kind: Option<&str>, service: Option<&str>, method: Option<&str>) -> Result<(String, String), Invalid> {
        let m = GrpcMethodMatch {
            kind: kind.map(str::to_owned),
            service: service.map(str::to_owned),
            method: method.map(str::to_owned),
        };
        let spec = GRPCRouteSpec {
            rules: vec![GrpcRouteRule {
                matches: vec![GrpcRouteMatch { method: Some(m), headers: vec![] }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let http = spec.as_http()?;
        let p = http.rules[0].matches[0].path.clone().unwrap();
        Ok((p.kind.unwrap(), p.value.unwrap()))
    }

    #[test]
    fn a_method_match_is_the_path_of_the_call() {
        let s = |a: &str, b: &str| Ok((a.to_owned(), b.to_owned()));
        assert_eq!(path_of(None, Some("demo.Greeter"), Some("SayHello")), s("Exact", "/demo.Greeter/SayHello"));
        assert_eq!(path_of(Some("Exact"), Some("demo.Greeter"), None), s("PathPrefix", "/demo.Greeter"));
        assert_eq!(path_of(None, None, Some("Say.Hello")), s("RegularExpression", "/[^/]+/Say\\.Hello"));
        assert_eq!(
            path_of(Some("RegularExpression"), Some("demo\\..*"), None),
            s("RegularExpression", "/(demo\\..*)/([^/]+)")
        );
        assert!(path_of(None, None, None).is_err());
        assert!(path_of(None, Some("a/b"), Some("M")).is_err());
        assert!(path_of(Some("Prefix"), Some("a"), None).is_err());
    }

    #[test]
    fn a_grpcroute_from_yaml_keeps_parents_headers_filters_and_backends() {
        let route: GRPCRoute = serde_norway::from_str(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: greeter, port: 90}]\n  rules:\n    - matches:\n        - method: {service: demo.Greeter, method: SayHello}\n          headers: [{name: x-user, value: ann}]\n      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}]\n      backendRefs: [{name: greeter-new, port: 90, weight: 3}]\n",
        )
        .unwrap();
        let http = route.spec.as_http().unwrap();
        assert_eq!(http.parent_refs, route.spec.parent_refs);
        let rule = &http.rules[0];
        assert_eq!(rule.matches[0].headers[0].name, "x-user");
        assert_eq!(rule.filters[0].kind, "RequestHeaderModifier");
        assert_eq!(rule.backend_refs[0].weight, Some(3));
        assert_eq!(rule.backend_refs[0].target.name, "greeter-new");
    }
}
