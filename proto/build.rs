//! Compiles the .proto files with protox (pure Rust: no system protoc) and
//! writes the descriptor set for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "quiver/v1/quiver.proto",
        "quiver/admin/v1/admin.proto",
        "quiver/peer/v1/peer.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("quiver_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::QuiverCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
