//! Compiles proto/ with protox (pure Rust: no system protoc) and writes the
//! descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["flute/tokenbroker/v1/token_broker.proto"], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("token_broker_descriptor.bin"), files.encode_to_vec())?;
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
