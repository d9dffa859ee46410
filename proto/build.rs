//! Generates the gRPC code for Pairvisor's protos (needs `protoc`, Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/pairvisor/v1/api.proto",
            "proto/pairvisor/agent/v1/agent.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
