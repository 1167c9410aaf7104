//! Compiles the mesh's protobuf contracts with `protox` (a pure-Rust protobuf compiler), so building
//! needs no system `protoc`.

use anyhow::Context;

const PROTOS: &[&str] = &[
    "authorization.proto",
    "citadel.proto",
    "discovery.proto",
    "envoy_core.proto",
    "rpc_status.proto",
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
        .compile_fds(descriptors)
        .context("generating Rust code from the protobuf descriptors")?;
    Ok(())
}
