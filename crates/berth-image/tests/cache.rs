//! The image cache: each artifact is made again only when its own inputs change, the
//! unchanged ones are the previous image's very files (same inode), and nothing that
//! no image references is left behind.
//!
//! The host side effects are fakes behind `berth_image::Tools` (a kernel the test
//! versions, a "rootfs" file naming the source's listing, counted mkfs runs), so these
//! run unprivileged and offline in milliseconds; `real_rootfs_…` stages and makes a
//! real ext4 image of a tiny tree when run as root.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use berth_image::cache::sha256_hex;
use berth_image::kernel::{self, Kernel, KernelError, KernelPackage};
use berth_image::rootfs::{self, RootfsError, Staged};
use berth_image::{
    build_with, manifest, BuildOutcome, BuildRequest, Image, Made, ManifestError, Progress, Quiet,
    Source, Tools,
};

struct Fake {
    kernel_version: Mutex<u32>,
    mkfs_runs: AtomicUsize,
    /// Stage and mkfs with the host's tools (needs root).
    real_rootfs: bool,
}

impl Fake {
    fn new(real_rootfs: bool) -> Self {
        Self {
            kernel_version: Mutex::new(1),
            mkfs_runs: AtomicUsize::new(0),
            real_rootfs,
        }
    }

    fn set_kernel(&self, version: u32) {
        *self.kernel_version.lock().expect("lock") = version;
    }

    fn mkfs_runs(&self) -> usize {
        self.mkfs_runs.load(Ordering::SeqCst)
    }
}

impl Tools for Fake {
    /// A "package" per version, kept where the real one is (`debs/`, `kernel/`).
    fn kernel(&self, _: &str, cache: &Path, _: &dyn Progress) -> Result<Kernel, KernelError> {
        let v = *self.kernel_version.lock().expect("lock");
        let package = KernelPackage {
            package: "linux-image-fake".into(),
            version: v.to_string(),
            sha256: sha256_hex(format!("fake kernel {v}").as_bytes()),
        };
        let dir = kernel::extracted_dir(cache, &package);
        fs::create_dir_all(dir.join("modules")).expect("kernel dir");
        fs::write(
            cache.join("debs").join(format!("{}.deb", package.sha256)),
            "deb",
        )
        .expect("deb");
        // Written once, as `kernel::extract` does: images hard-link this vmlinux.
        let vmlinux = dir.join("vmlinux");
        let module = dir.join("modules/virtio_blk.ko");
        if !vmlinux.exists() {
            fs::write(&vmlinux, format!("vmlinux {v}")).expect("vmlinux");
            fs::write(&module, format!("module {v}")).expect("module");
        }
        Ok(Kernel {
            package,
            release: format!("6.1.0-{v}-fake"),
            vmlinux,
            modules: vec![module],
        })
    }

    fn isolate(&self) -> Result<(), RootfsError> {
        if self.real_rootfs {
            rootfs::enter_private_mount_namespace()
        } else {
            Ok(())
        }
    }

    fn stage(
        &self,
        source: &Source,
        excludes: &[String],
        staging: &Path,
        scratch: &Path,
    ) -> Result<Staged, RootfsError> {
        if self.real_rootfs {
            return rootfs::stage(source, excludes, staging, scratch);
        }
        let Source::Dir(dir) = source else {
            panic!("the fake stages directories only");
        };
        let mut listing = String::new();
        let entries = list(dir, Path::new(""), &mut listing);
        Ok(Staged {
            root: dir.clone(),
            listing_sha256: sha256_hex(listing.as_bytes()),
            entries,
            content_bytes: listing.len() as u64,
            masked: vec![],
            excluded: vec![],
        })
    }

    fn unstage(&self, staging: &Path) {
        if self.real_rootfs {
            rootfs::unstage(staging)
        }
    }

    fn mkfs(
        &self,
        staged: &Staged,
        out: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, RootfsError> {
        self.mkfs_runs.fetch_add(1, Ordering::SeqCst);
        if self.real_rootfs {
            return rootfs::mkfs(staged, out, progress);
        }
        let body = format!("ext4 of {}", staged.listing_sha256);
        fs::write(out, &body).expect("fake rootfs");
        Ok(body.len() as u64)
    }
}

/// Paths and contents under `dir`, sorted; the number of entries.
fn list(dir: &Path, rel: &Path, out: &mut String) -> u64 {
    let mut names: Vec<_> = fs::read_dir(dir.join(rel))
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let mut n = 0;
    for name in names {
        let rel = rel.join(name);
        let path = dir.join(&rel);
        n += 1;
        if path.is_dir() {
            out.push_str(&format!("{}/\n", rel.display()));
            n += list(dir, &rel, out);
        } else {
            let body = fs::read_to_string(&path).expect("read");
            out.push_str(&format!("{} {body:?}\n", rel.display()));
        }
    }
    n
}

/// A 64-bit ELF header without program headers (a static program needing no
/// libraries), then `tag`: a stand-in berth binary that `tag` tells apart.
fn write_init(path: &Path, tag: &str) {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[18] = 62; // x86-64
    elf.extend_from_slice(tag.as_bytes());
    // Replaced, not rewritten in place, the way cargo and installs do it.
    let tmp = path.with_extension("new");
    fs::write(&tmp, elf).expect("init");
    fs::rename(&tmp, path).expect("init");
}

struct Setup {
    tmp: tempfile::TempDir,
    req: BuildRequest,
    fake: Fake,
}

impl Setup {
    fn new(real_rootfs: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("etc")).expect("src");
        fs::write(src.join("etc/os-release"), "ID=cache-test\n").expect("src");
        fs::write(src.join("hello.txt"), "hello\n").expect("src");
        let init = tmp.path().join("berth");
        write_init(&init, "berth 1");
        let mut req = BuildRequest::new(
            tmp.path().join("data"),
            "test".into(),
            Source::Dir(src),
            init,
        );
        // objcopy would refuse the stand-in /init.
        req.strip_init = false;
        Self {
            tmp,
            req,
            fake: Fake::new(real_rootfs),
        }
    }

    fn build(&self) -> BuildOutcome {
        build_with(&self.req, &Quiet, &self.fake).expect("build")
    }

    fn images(&self) -> PathBuf {
        self.req.data_dir.join("images")
    }

    fn src(&self) -> PathBuf {
        self.tmp.path().join("src")
    }

    /// What `images/` holds besides `cache/`: only the image itself, no build dirs.
    fn assert_no_leftovers(&self) {
        let mut names: Vec<String> = fs::read_dir(self.images())
            .expect("list images")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["cache", "test"]);
        let mut files: Vec<String> = fs::read_dir(self.images().join("test"))
            .expect("list image")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                manifest::INITRAMFS,
                manifest::MANIFEST,
                manifest::ROOTFS,
                manifest::VMLINUX
            ]
        );
    }
}

/// The initramfs's cpio, out of its lz4 frame.
fn cpio(image: &Image) -> Vec<u8> {
    assert_eq!(
        image.manifest.artifacts.initramfs.format,
        berth_image::initramfs::FORMAT
    );
    let frame = fs::read(&image.initramfs).expect("read initramfs");
    kernel::lz4_legacy_decompress(&frame).expect("an lz4 legacy frame")
}

fn ino(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").ino()
}

/// (inode, mtime) of each artifact and the manifest: equal means not rewritten. (Not
/// the ctime: each build hard-links the cached kernel, whose inode `vmlinux` shares.)
fn stamps(image: &Image) -> Vec<(u64, i64, i64)> {
    [
        image.vmlinux.clone(),
        image.initramfs.clone(),
        image.rootfs.clone(),
        image.dir.join(manifest::MANIFEST),
    ]
    .iter()
    .map(|p| {
        let m = fs::metadata(p).expect("stat");
        (m.ino(), m.mtime(), m.mtime_nsec())
    })
    .collect()
}

const ALL: Made = Made {
    vmlinux: true,
    initramfs: true,
    rootfs: true,
};

#[test]
fn same_inputs_twice_change_nothing() {
    let s = Setup::new(false);
    let first = s.build();
    assert!(!first.cached);
    assert_eq!(first.made, ALL);
    let before = stamps(&first.image);

    let again = s.build();
    assert!(again.cached, "unchanged inputs must be a cache hit");
    assert_eq!(again.made, Made::default());
    assert_eq!(again.image.manifest, first.image.manifest);
    assert_eq!(stamps(&again.image), before, "a cache hit rewrote a file");
    assert_eq!(s.fake.mkfs_runs(), 1);
    s.assert_no_leftovers();
}

#[test]
fn new_init_remakes_only_the_initramfs() {
    let s = Setup::new(false);
    let first = s.build().image;
    let old_rootfs = File::open(&first.rootfs).expect("open rootfs");
    let old_initramfs = File::open(&first.initramfs).expect("open initramfs");
    let rootfs_ino = ino(&first.rootfs);
    let vmlinux_ino = ino(&first.vmlinux);

    write_init(&s.req.init, "berth 2");
    let second = s.build();
    assert!(!second.cached);
    assert_eq!(
        second.made,
        Made {
            vmlinux: false,
            initramfs: true,
            rootfs: false
        }
    );
    let image = &second.image;
    // The rootfs is the same file, not a copy and not rewritten.
    assert_eq!(s.fake.mkfs_runs(), 1);
    assert_eq!(ino(&image.rootfs), rootfs_ino);
    assert_eq!(ino(&image.vmlinux), vmlinux_ino);
    assert_eq!(old_rootfs.metadata().expect("fstat").nlink(), 1);
    assert_eq!(
        image.manifest.artifacts.rootfs,
        first.manifest.artifacts.rootfs
    );
    // The initramfs is new and holds the new /init; the old one is gone for good.
    assert_eq!(
        old_initramfs.metadata().expect("fstat").nlink(),
        0,
        "the previous initramfs is still linked somewhere"
    );
    let cpio = cpio(image);
    assert!(cpio.windows(7).any(|w| w == b"berth 2"));
    assert!(!cpio.windows(7).any(|w| w == b"berth 1"));
    let new_init_sha = berth_image::cache::sha256_file(&s.req.init).expect("hash");
    assert_eq!(image.manifest.init.sha256, new_init_sha);
    assert_ne!(image.manifest.init.sha256, first.manifest.init.sha256);
    assert_ne!(
        image.manifest.artifacts.initramfs.input_sha256,
        first.manifest.artifacts.initramfs.input_sha256
    );
    assert_eq!(
        image.manifest.artifacts.initramfs.sha256,
        berth_image::cache::sha256_file(&image.initramfs).expect("hash")
    );
    s.assert_no_leftovers();

    // And the new image is itself the cache for the next build.
    assert!(s.build().cached);
}

#[test]
fn new_kernel_remakes_kernel_and_initramfs_and_prunes_the_old_kernel() {
    let s = Setup::new(false);
    let first = s.build().image;
    let rootfs_ino = ino(&first.rootfs);
    let cache = s.images().join("cache");
    let old_kernel_dir = {
        let pkg = KernelPackage {
            package: first.manifest.kernel.package.clone(),
            version: first.manifest.kernel.version.clone(),
            sha256: first.manifest.kernel.deb_sha256.clone(),
        };
        kernel::extracted_dir(&cache, &pkg)
    };
    assert!(old_kernel_dir.is_dir());

    s.fake.set_kernel(2);
    let second = s.build();
    assert_eq!(
        second.made,
        Made {
            vmlinux: true,
            initramfs: true,
            rootfs: false
        }
    );
    let image = &second.image;
    assert_eq!(ino(&image.rootfs), rootfs_ino);
    assert_eq!(s.fake.mkfs_runs(), 1);
    assert_eq!(fs::read(&image.vmlinux).expect("vmlinux"), b"vmlinux 2");
    assert_eq!(image.manifest.kernel.release, "6.1.0-2-fake");
    let cpio = cpio(image);
    assert!(cpio.windows(8).any(|w| w == b"module 2"));
    assert!(cpio.windows(12).any(|w| w == b"6.1.0-2-fake"));

    // Kernel 1 is in no image any more: its cached package and extraction are gone.
    assert!(!old_kernel_dir.exists());
    let debs: Vec<String> = fs::read_dir(cache.join("debs"))
        .expect("debs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(debs, [format!("{}.deb", image.manifest.kernel.deb_sha256)]);
    assert_eq!(
        fs::read_dir(cache.join("kernel")).expect("kernels").count(),
        1
    );
    s.assert_no_leftovers();
}

#[test]
fn new_source_remakes_only_the_rootfs() {
    let s = Setup::new(false);
    let first = s.build().image;
    let old_rootfs = File::open(&first.rootfs).expect("open rootfs");
    let initramfs_ino = ino(&first.initramfs);

    fs::write(s.src().join("hello.txt"), "hello again\n").expect("edit source");
    let second = s.build();
    assert_eq!(
        second.made,
        Made {
            vmlinux: false,
            initramfs: false,
            rootfs: true
        }
    );
    assert_eq!(s.fake.mkfs_runs(), 2);
    assert_eq!(ino(&second.image.initramfs), initramfs_ino);
    assert_eq!(second.image.manifest.init, first.manifest.init);
    assert_eq!(
        old_rootfs.metadata().expect("fstat").nlink(),
        0,
        "the previous rootfs is still linked somewhere"
    );
    s.assert_no_leftovers();
}

#[test]
fn force_remakes_everything() {
    let s = Setup::new(false);
    s.build();
    let mut req = s.req.clone();
    req.force = true;
    let forced = build_with(&req, &Quiet, &s.fake).expect("forced build");
    assert!(!forced.cached);
    assert_eq!(forced.made, ALL);
    assert_eq!(s.fake.mkfs_runs(), 2);
    s.assert_no_leftovers();
}

#[test]
fn image_of_an_older_format_is_refused_then_rebuilt() {
    let s = Setup::new(false);
    let first = s.build().image;
    // Turn it into what berth wrote before: format 1, no input hash per artifact.
    let path = first.dir.join(manifest::MANIFEST);
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
    json["format"] = 1.into();
    json["input_sha256"] = "0".repeat(64).into();
    for a in ["vmlinux", "initramfs", "rootfs"] {
        json["artifacts"][a]
            .as_object_mut()
            .expect("artifact")
            .remove("input_sha256");
    }
    fs::write(&path, serde_json::to_vec(&json).expect("encode")).expect("write");

    let err = Image::open(&s.req.data_dir, "test").expect_err("format 1");
    assert!(
        matches!(err, ManifestError::Format { found: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("berth image build"), "{err}");

    let rebuilt = s.build();
    assert!(!rebuilt.cached);
    assert_eq!(rebuilt.made, ALL, "nothing of another format is reused");
    assert_eq!(rebuilt.image.manifest.format, manifest::FORMAT);
    Image::open(&s.req.data_dir, "test").expect("the rebuilt image opens");
    s.assert_no_leftovers();
}

/// What berth wrote before the initramfs was compressed: the same manifest format,
/// an uncompressed `initramfs.cpio` hashed under the previous layout.
#[test]
fn image_with_an_uncompressed_initramfs_remakes_only_that() {
    let s = Setup::new(false);
    let first = s.build().image;
    let old = first.dir.join("initramfs.cpio");
    fs::write(&old, cpio(&first)).expect("write the uncompressed archive");
    fs::remove_file(&first.initramfs).expect("remove");
    let path = first.dir.join(manifest::MANIFEST);
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
    let a = &mut json["artifacts"]["initramfs"];
    a["path"] = "initramfs.cpio".into();
    a["format"] = "cpio-newc".into();
    a["size"] = fs::metadata(&old).expect("stat").len().into();
    a["input_sha256"] = "0".repeat(64).into();
    fs::write(&path, serde_json::to_vec(&json).expect("encode")).expect("write");
    // It still opens (the kernel unpacks an uncompressed initramfs too) ...
    let opened = Image::open(&s.req.data_dir, "test").expect("a format-2 image");
    assert_eq!(opened.initramfs, old);
    let rootfs_ino = ino(&first.rootfs);

    // ... and a build remakes its initramfs, keeping the rest.
    let rebuilt = s.build();
    assert_eq!(
        rebuilt.made,
        Made {
            vmlinux: false,
            initramfs: true,
            rootfs: false
        }
    );
    assert_eq!(s.fake.mkfs_runs(), 1);
    assert_eq!(ino(&rebuilt.image.rootfs), rootfs_ino);
    let art = &rebuilt.image.manifest.artifacts.initramfs;
    assert_eq!(art.path, manifest::INITRAMFS);
    assert_eq!(
        art.input_sha256,
        first.manifest.artifacts.initramfs.input_sha256
    );
    assert!(cpio(&rebuilt.image).windows(7).any(|w| w == b"berth 1"));
    s.assert_no_leftovers();
    assert!(s.build().cached);
}

#[test]
fn concurrent_builds_of_one_image_take_turns() {
    let s = Setup::new(false);
    let outcomes: Vec<BuildOutcome> = std::thread::scope(|scope| {
        let builds: Vec<_> = (0..4).map(|_| scope.spawn(|| s.build())).collect();
        builds
            .into_iter()
            .map(|b| b.join().expect("build thread"))
            .collect()
    });
    assert_eq!(outcomes.iter().filter(|o| !o.cached).count(), 1);
    assert_eq!(s.fake.mkfs_runs(), 1);
    s.assert_no_leftovers();
}

#[test]
fn real_rootfs_is_kept_when_only_init_changes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: staging a rootfs needs root");
        return;
    }
    let s = Setup::new(true);
    let first = s.build().image;
    let rootfs = fs::read(&first.rootfs).expect("read rootfs");
    assert_eq!(&rootfs[1080..1082], [0x53, 0xef], "not an ext4 image");
    let rootfs_ino = ino(&first.rootfs);
    let mtime = fs::metadata(&first.rootfs)
        .and_then(|m| m.modified())
        .expect("mtime");

    write_init(&s.req.init, "berth 2");
    let second = s.build();
    assert!(!second.cached);
    assert!(second.made.initramfs && !second.made.rootfs);
    assert_eq!(s.fake.mkfs_runs(), 1);
    assert_eq!(ino(&second.image.rootfs), rootfs_ino);
    assert_eq!(
        fs::metadata(&second.image.rootfs)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime
    );
    assert!(s.build().cached);

    fs::write(s.src().join("hello.txt"), "hello again\n").expect("edit source");
    let third = s.build();
    assert!(third.made.rootfs && !third.made.initramfs);
    assert_ne!(ino(&third.image.rootfs), rootfs_ino);
    s.assert_no_leftovers();
}
