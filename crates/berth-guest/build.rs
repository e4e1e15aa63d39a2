fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/guest.proto");
    tonic_prost_build::configure()
        // No `GuestClient::connect(url)`: the host dials its own transports (`client.rs`),
        // and the generated helper would clash with the `Connect` RPC's method.
        .build_transport(false)
        // Every `bytes` field decodes as `bytes::Bytes`: output and file chunks are then
        // slices of the receive buffer instead of fresh `Vec`s (one copy less per chunk).
        .bytes(".")
        .compile_protos(&["proto/guest.proto"], &["proto"])?;
    Ok(())
}
