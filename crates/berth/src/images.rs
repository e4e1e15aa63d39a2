//! Built guest images (`berth image build`) as the microVM driver sees them: a runtime's
//! `image` (`host` or a rootfs dir) names the image built from that source.

use std::path::{Path, PathBuf};

use berth_image::{Image, Source};
use berth_sandbox::{GuestImage, GuestImages};

pub struct BuiltImages {
    /// The dir holding `images/<name>/` (the server's data dir by default).
    pub root: PathBuf,
}

impl BuiltImages {
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
        Ok(GuestImage {
            kernel: built.vmlinux,
            initrd: built.initramfs,
            rootfs: built.rootfs,
        })
    }
}
