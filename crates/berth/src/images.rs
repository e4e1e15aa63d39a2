//! Built guest images (`berth image build`) as the microVM driver sees them: a runtime's
//! `image` (`host` or a rootfs dir) names the image built from that source.

use std::path::{Path, PathBuf};

use berth_image::{Image, Source};
use berth_sandbox::{GuestImage, GuestImages};

pub struct BuiltImages {
    /// The dir holding `images/<name>/` (the server's data dir by default).
    pub root: PathBuf,
    /// SHA-256 of this berth binary, computed on first use: an image whose `/init`
    /// came from another build would speak another guest protocol version.
    own_sha256: std::sync::OnceLock<Option<String>>,
}

impl BuiltImages {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            own_sha256: std::sync::OnceLock::new(),
        }
    }

    /// Hash this binary now (off the request path), so the first microVM request does
    /// not wait for it.
    pub fn warm_up(self: &std::sync::Arc<Self>) {
        let images = self.clone();
        std::thread::spawn(move || {
            images.own_sha256();
        });
    }

    fn own_sha256(&self) -> Option<&str> {
        self.own_sha256
            .get_or_init(|| {
                let exe = std::env::current_exe().ok()?;
                berth_image::cache::sha256_file(&exe).ok()
            })
            .as_deref()
    }

    /// The image name `berth image build --from <image>` uses by default.
    pub fn name_for(image: &str) -> String {
        if image == berth_api::runtime::defaults::IMAGE_HOST {
            return berth_image::default_name(&Source::Host);
        }
        let dir = Path::new(image);
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        berth_image::default_name(&Source::Dir(dir))
    }
}

impl GuestImages for BuiltImages {
    fn find(&self, image: &str) -> Result<GuestImage, String> {
        let name = Self::name_for(image);
        let from = if image == berth_api::runtime::defaults::IMAGE_HOST {
            "host".to_string()
        } else {
            image.to_string()
        };
        let built = Image::open(&self.root, &name).map_err(|e| {
            format!(
                "no usable microVM guest image for {image:?} ({e}); build it on the server \
                 with `berth image build --from {from}`"
            )
        })?;
        if let Some(own) = self.own_sha256() {
            if built.manifest.init.sha256 != own {
                return Err(format!(
                    "the microVM guest image for {image:?} was built by another berth binary \
                     (its guest agent may not match this server); rebuild it on the server \
                     with `berth image build --from {from}`"
                ));
            }
        }
        Ok(GuestImage {
            kernel: built.vmlinux,
            initrd: built.initramfs,
            rootfs: built.rootfs,
        })
    }
}
