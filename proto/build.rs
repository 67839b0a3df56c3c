//! Compiles proto/dr/v1/*.proto with protox (pure Rust), so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "dr/v1/common.proto",
        "dr/v1/agent.proto",
        "dr/v1/control.proto",
        "dr/v1/raft.proto",
        "dr/v1/backup.proto",
        "dr/v1/operations.proto",
        "dr/v1/restore.proto",
        "dr/v1/security.proto",
        "dr/v1/response.proto",
        "dr/v1/incident.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("dr_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Small per-stream buffers: 10,000 agent sessions on one leader (src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .compile_fds(fds)?;
    Ok(())
}
