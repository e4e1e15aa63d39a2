fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/guest.proto");
    tonic_prost_build::configure().compile_protos(&["proto/guest.proto"], &["proto"])?;
    Ok(())
}
