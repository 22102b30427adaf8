//! Compiles proto/ with protox (pure Rust: no system protoc) and writes the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true);
    compiler.open_file("flute/tokenbroker/v1/token_broker.proto")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded from protox's own descriptors (custom options survive).
    std::fs::write(
        out_dir.join("token_broker_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let files = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Token carries the access token: its Debug is written by hand, redacted.
        .skip_debug([".flute.tokenbroker.v1.Token"])
        // prost's codec, but undecodable requests are INVALID_ARGUMENT.
        .codec_path("crate::grpc::codec::BrokerCodec")
        .compile_fds(files)?;
    Ok(())
}
