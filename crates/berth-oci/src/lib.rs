//! OCI images for Berth: pull an image from any registry (`oci-client`: anonymous, or
//! with credentials from a Docker `config.json`; plain HTTP for loopback and listed
//! registries), verify every blob's size and digest, and unpack its layers in order,
//! honouring whiteouts, into a cached rootfs directory keyed by the manifest digest.
//!
//! - [`ImageCache`]: pulls, the cache layout, per-digest locks, removal.
//! - [`unpack`]: applying tar layers to a directory safely (the tricky part; its rules
//!   are in its module docs).
//! - [`RegistryConfig`]: how each registry is reached and authenticated.
//! - [`ImageConfig`]: entrypoint, cmd, env, working dir, user and ports of an image.
//!
//! The crate is separate from the server so that its registry client (reqwest 0.13)
//! and decompressors build and test on their own. `README.md` beside this file records
//! the decisions.

mod cache;
mod image_config;
mod registry;
pub mod unpack;

pub use cache::{
    cache_key, parse_reference, CachedImage, DigestGuard, ImageCache, Limits, PullError,
};
pub use image_config::{host_arch, ConfigBlobError, ImageConfig};
/// The registry client, for callers that push test images.
pub use oci_client;
pub use registry::{normalize as normalize_registry, CredentialsError, RegistryConfig};

/// Make ring the process's rustls provider unless one is installed: the registry client
/// (reqwest 0.13) is built without a bundled provider, and panics without one. Callers
/// that build their own `oci_client::Client` call this first; [`ImageCache::new`] does.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its sources, `: `-separated, for a message a user reads.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
