//! The labels and annotations that drive the mesh, with Istio's names and values: shared by the
//! control plane, the node agent and the CLI, so each reads them the same way.

/// Namespace (and pod) label that enrolls workloads in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// `istio.io/dataplane-mode` value that enrolls a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// `istio.io/dataplane-mode` value that opts a pod (or namespace) out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Label on a namespace, service or pod naming the waypoint its traffic goes through.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Optional label next to `istio.io/use-waypoint`: the waypoint's namespace, when not the object's.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label on a waypoint Gateway: which traffic it handles (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The `gatewayClassName` of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// `istio.io/use-waypoint` value meaning "no waypoint, even if the namespace has one".
pub const USE_WAYPOINT_NONE: &str = "none";
/// Annotation that makes an AuthorizationPolicy dry-run (`"true"`): evaluated and logged, never
/// enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// Node label: the region of the node's pods (their locality).
pub const TOPOLOGY_REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Node label: the zone of the node's pods.
pub const TOPOLOGY_ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label: the subzone of the node's pods (Istio's own).
pub const TOPOLOGY_SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Pod label overriding its node's locality: `region[.zone[.subzone]]` (dots, as `/` is not
/// allowed in label values).
pub const LOCALITY_LABEL: &str = "istio-locality";

/// A label given on a command line, `key=value` (the value may be empty, the key not).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_is_key_equals_value() {
        assert_eq!(parse_label("istio=ingressgateway"), Ok(("istio".into(), "ingressgateway".into())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("=v").is_err() && parse_label("novalue").is_err());
    }
}
