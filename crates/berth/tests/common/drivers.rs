//! One scenario, every driver: `both!(scenario)` turns `async fn scenario(Server,
//! Isolation)` into the tests `scenario::namespace` and `scenario::microvm`, each on a
//! server of its own.
//!
//! The microVM runs boot a real guest kernel under QEMU (TCG on hosts whose KVM cannot
//! boot Linux guests): the guest image is built once per machine with
//! `berth image build --from host` into a shared dir under the target dir, and every
//! microVM test server reads it through `--guest-images`. Select one driver's runs with
//! nextest's `-E 'test(/::microvm$/)'`.

use std::future::Future;
use std::path::PathBuf;

use berth_api::{Isolation, RuntimeSpec};

use super::{uniq, Server, BERTH};

/// Define `mod $scenario { namespace, microvm }`, two tests running
/// `async fn $scenario(Server, Isolation)`. Attributes after `microvm:` go on the
/// microVM test only, e.g. `both!(x; microvm: #[ignore = "microvm: <the bug>"]);`.
#[macro_export]
macro_rules! both {
    ($scenario:ident $(; microvm: $(#[$microvm:meta])*)?) => {
        mod $scenario {
            #[tokio::test]
            async fn namespace() {
                $crate::common::drivers::run(
                    concat!(module_path!(), "::namespace"),
                    berth_api::Isolation::Namespace,
                    super::$scenario,
                )
                .await;
            }

            #[tokio::test]
            $($(#[$microvm])*)?
            async fn microvm() {
                $crate::common::drivers::run(
                    concat!(module_path!(), "::microvm"),
                    berth_api::Isolation::Microvm,
                    super::$scenario,
                )
                .await;
            }
        }
    };
}

/// Run `scenario` on a fresh server able to run `isolation`, unless this host cannot.
pub async fn run<F, Fut>(test: &str, isolation: Isolation, scenario: F)
where
    F: FnOnce(Server, Isolation) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(s) = server(test, isolation).await {
        scenario(s, isolation).await;
    }
}

/// Where the shared guest image lives (`<dir>/images/host/`).
pub fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("berth-guest-images")
}

pub fn qemu_available() -> bool {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Build (or find cached) the `host` guest image. Concurrent tests wait on the build's
/// own lock; later calls are cache hits.
pub fn ensure_image() {
    let out = std::process::Command::new(BERTH)
        .args(["image", "build", "--from", "host", "--data-dir"])
        .arg(images_dir())
        .output()
        .expect("run berth image build");
    assert!(
        out.status.success(),
        "berth image build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server able to run `isolation`, or `None` (with the reason printed) when it cannot
/// run here at all.
pub async fn server(test: &str, isolation: Isolation) -> Option<Server> {
    server_with(test, isolation, &[]).await
}

/// [`server`] with extra `berth server` flags. The server's default isolation is pinned
/// to `isolation`, so sessions created on first use (the `default` runtime) and runtimes
/// without an isolation run on the driver under test too.
pub async fn server_with(test: &str, isolation: Isolation, extra: &[&str]) -> Option<Server> {
    let mut args = vec!["--default-isolation", isolation.name()];
    let images = images_dir().display().to_string();
    if isolation == Isolation::Microvm {
        if super::skip_unless_root(test) {
            return None;
        }
        if !qemu_available() {
            eprintln!("skipping {test}: qemu-system-x86_64 is not installed");
            return None;
        }
        tokio::task::spawn_blocking(ensure_image)
            .await
            .expect("image build task");
        args.extend(["--guest-images", images.as_str()]);
    }
    args.extend_from_slice(extra);
    Server::start_with(test, &args).await
}

/// A runtime of `isolation` with test-sized limits (512 MiB of memory: a microVM's
/// guest RAM, allocated as it is touched).
pub async fn runtime(s: &Server, isolation: Isolation) -> String {
    runtime_with(s, isolation, |_| {}).await
}

/// [`runtime`], then `f` adjusts the spec.
pub async fn runtime_with(
    s: &Server,
    isolation: Isolation,
    f: impl FnOnce(&mut RuntimeSpec),
) -> String {
    s.runtime(&uniq("rt"), |r| {
        r.isolation = isolation;
        r.memory = 512 << 20;
        f(r);
    })
    .await
}

/// A running session on a fresh [`runtime`] of `isolation`.
pub async fn session(s: &Server, isolation: Isolation, prefix: &str) -> String {
    let rt = runtime(s, isolation).await;
    s.session(&uniq(prefix), &rt).await
}
