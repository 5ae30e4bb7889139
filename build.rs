//! Compiles the wire contract in `proto/` with protoc from `protoc-bin-vendored`
//! (nothing needs to be installed) and writes the file-descriptor set that the
//! reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the env concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/rota/v1/jobs.proto",
        "proto/rota/v1/schedules.proto",
        "proto/rota/v1/workers.proto",
        "proto/rota/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rota_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
