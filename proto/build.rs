//! Compiles the mesh's protobuf contracts with `protox` (a pure-Rust protobuf compiler), so building
//! needs no system `protoc`.

use anyhow::Context;

const PROTOS: &[&str] = &[
    "authorization.proto",
    "ca.proto",
    "citadel.proto",
    "discovery.proto",
    "envoy_core.proto",
    "rpc_status.proto",
    "waypoint.proto",
    "workload.proto",
    "zds.proto",
];

fn main() -> anyhow::Result<()> {
    for file in PROTOS {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let files: Vec<String> = PROTOS.iter().map(|f| format!("proto/{f}")).collect();
    let descriptors = protox::compile(&files, ["proto"]).context("compiling the .proto files")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Our own waypoint types double as the control plane's domain model for them: the admin
        // API dumps them as JSON.
        .type_attribute(".ambient.waypoint.v1", "#[cfg_attr(feature = \"serde\", derive(serde::Serialize))]")
        .compile_fds(descriptors)
        .context("generating Rust code from the protobuf descriptors")?;
    Ok(())
}
