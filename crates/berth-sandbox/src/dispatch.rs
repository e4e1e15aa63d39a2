//! One [`Driver`] over several: each runtime names its isolation, and a session's calls
//! go to the driver that runs it. Both drivers keep workspaces at the same path in the
//! same ext4 format, so a session may move between them across a stop.
//!
//! A runtime whose isolation is `auto` gets the server's default, decided when each
//! sandbox starts (see [`Drivers::resolve`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use berth_api::{Isolation, RuntimeSpec};
use berth_core::driver::{Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};

pub struct Drivers {
    namespace: Arc<dyn Driver>,
    /// `Err` says why microVMs cannot run on this server.
    microvm: Result<Arc<dyn Driver>, String>,
    /// What `auto` means on this server (`auto` again: ask the microVM driver).
    default: Isolation,
    /// Which driver runs each session it started or adopted.
    running: Mutex<HashMap<String, Isolation>>,
}

impl Drivers {
    pub fn new(namespace: Arc<dyn Driver>, microvm: Result<Arc<dyn Driver>, String>) -> Self {
        Self {
            namespace,
            microvm,
            default: Isolation::Auto,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Pin what `auto` isolation means here (`berth server --default-isolation`).
    pub fn with_default(mut self, default: Isolation) -> Self {
        self.default = default;
        self
    }

    /// The concrete isolation a sandbox of `runtime` gets now. `auto` follows the
    /// server's default; an unpinned default is a microVM only where that driver says it
    /// can run the runtime fast here (KVM boots the guest, an image is built, and every
    /// host mount is a directory: microVMs share directories only).
    pub async fn resolve(&self, runtime: &RuntimeSpec) -> Isolation {
        match (runtime.isolation, self.default) {
            (Isolation::Auto, Isolation::Auto) => match &self.microvm {
                Ok(vm) if vm.preferred(runtime).await => Isolation::Microvm,
                _ => Isolation::Namespace,
            },
            (Isolation::Auto, pinned) => pinned,
            (explicit, _) => explicit,
        }
    }

    /// The isolation `validate` checks against (no probing: validation is synchronous;
    /// an unpinned `auto` only becomes a microVM when that would pass too).
    fn resolve_now(&self, runtime: &RuntimeSpec) -> Isolation {
        match (runtime.isolation, self.default) {
            (Isolation::Auto, Isolation::Auto) => Isolation::Namespace,
            (Isolation::Auto, pinned) => pinned,
            (explicit, _) => explicit,
        }
    }

    fn pick(&self, isolation: Isolation) -> Result<&Arc<dyn Driver>, DriverError> {
        match isolation {
            // Callers resolve `auto` first; the namespace driver is its safe meaning.
            Isolation::Auto | Isolation::Namespace => Ok(&self.namespace),
            Isolation::Microvm => {
                self.microvm
                    .as_ref()
                    .map_err(|why| DriverError::InvalidRuntime {
                        field: "isolation",
                        message: format!(
                            "microvm isolation is not available on this server: {why}"
                        ),
                    })
            }
        }
    }

    /// Every driver this server has.
    fn all(&self) -> impl Iterator<Item = &Arc<dyn Driver>> {
        std::iter::once(&self.namespace).chain(self.microvm.as_ref().ok())
    }

    /// The driver running `session`, else the namespace one.
    fn of(&self, session: &str) -> &Arc<dyn Driver> {
        let isolation = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(session).copied());
        match isolation {
            Some(isolation) => self.pick(isolation).unwrap_or(&self.namespace),
            None => &self.namespace,
        }
    }

    fn remember(&self, session: &str, isolation: Isolation) {
        if let Ok(mut r) = self.running.lock() {
            r.insert(session.to_string(), isolation);
        }
    }

    fn forget(&self, session: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(session);
        }
    }
}

#[async_trait]
impl Driver for Drivers {
    fn name(&self) -> &'static str {
        if self.microvm.is_ok() {
            "namespace+microvm"
        } else {
            "namespace"
        }
    }

    fn validate(&self, runtime: &RuntimeSpec) -> Result<(), DriverError> {
        self.pick(self.resolve_now(runtime))?.validate(runtime)
    }

    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        let isolation = self.resolve(&req.runtime).await;
        let driver = self.pick(isolation)?;
        let sandbox = driver.start(req).await?;
        self.remember(&req.session_id, isolation);
        Ok(sandbox)
    }

    /// An `auto` session is looked for where `auto` points now; if that changed since
    /// the last server (an image was deleted, say), the other driver's remains are
    /// leftovers that the core stops.
    async fn adopt(&self, req: &SandboxRequest) -> Result<Option<Sandbox>, DriverError> {
        let isolation = self.resolve(&req.runtime).await;
        let Ok(driver) = self.pick(isolation) else {
            return Ok(None);
        };
        let adopted = driver.adopt(req).await?;
        if adopted.is_some() {
            self.remember(&req.session_id, isolation);
        }
        Ok(adopted)
    }

    async fn is_alive(&self, session_id: &str) -> bool {
        self.of(session_id).is_alive(session_id).await
    }

    async fn exit_reason(&self, session_id: &str) -> &'static str {
        self.of(session_id).exit_reason(session_id).await
    }

    /// Stops the session in every driver: a leftover found at start may belong to
    /// either, and stopping what does not exist is a no-op.
    async fn stop(&self, session_id: &str) -> Result<(), DriverError> {
        let mut result = Ok(());
        for driver in self.all() {
            if let Err(e) = driver.stop(session_id).await {
                result = result.and(Err(e));
            }
        }
        self.forget(session_id);
        result
    }

    async fn stats(&self, session_id: &str) -> Option<SandboxStats> {
        self.of(session_id).stats(session_id).await
    }

    async fn workspace_bytes(&self, session_id: &str) -> u64 {
        self.of(session_id).workspace_bytes(session_id).await
    }

    /// Each driver refuses while it runs the session; the image is the same file.
    async fn delete_workspace(&self, session_id: &str) -> Result<(), DriverError> {
        let running = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(session_id).copied());
        if let Some(isolation) = running {
            return self.pick(isolation)?.delete_workspace(session_id).await;
        }
        for driver in self.all() {
            driver.delete_workspace(session_id).await?;
        }
        Ok(())
    }

    async fn leftovers(&self) -> Vec<String> {
        let mut ids = vec![];
        for driver in self.all() {
            ids.extend(driver.leftovers().await);
        }
        ids.sort();
        ids.dedup();
        ids
    }

    fn workspace_image(&self, session_id: &str) -> PathBuf {
        self.namespace.workspace_image(session_id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts calls; `start` hands back a guest that is never dialled.
    #[derive(Default)]
    struct Fake {
        name: &'static str,
        starts: AtomicUsize,
        stops: AtomicUsize,
        alive_checks: AtomicUsize,
        /// What `preferred` answers (a microVM driver with KVM and an image).
        fast: bool,
    }

    #[async_trait]
    impl Driver for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn validate(&self, _: &RuntimeSpec) -> Result<(), DriverError> {
            Ok(())
        }
        async fn preferred(&self, _: &RuntimeSpec) -> bool {
            self.fast
        }
        async fn start(&self, _: &SandboxRequest) -> Result<Sandbox, DriverError> {
            self.starts.fetch_add(1, Ordering::SeqCst);
            let channel =
                tonic::transport::Endpoint::from_static("http://fake.invalid").connect_lazy();
            Ok(Sandbox {
                guest: berth_guest::proto::guest_client::GuestClient::new(channel),
                init_pid: 1,
            })
        }
        async fn adopt(&self, _: &SandboxRequest) -> Result<Option<Sandbox>, DriverError> {
            Ok(None)
        }
        async fn is_alive(&self, _: &str) -> bool {
            self.alive_checks.fetch_add(1, Ordering::SeqCst);
            true
        }
        async fn stop(&self, _: &str) -> Result<(), DriverError> {
            self.stops.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn stats(&self, _: &str) -> Option<SandboxStats> {
            None
        }
        async fn workspace_bytes(&self, _: &str) -> u64 {
            0
        }
        async fn delete_workspace(&self, _: &str) -> Result<(), DriverError> {
            Ok(())
        }
        async fn leftovers(&self) -> Vec<String> {
            vec![format!("{}-leftover", self.name), "shared".into()]
        }
        fn workspace_image(&self, session: &str) -> PathBuf {
            PathBuf::from(session)
        }
    }

    fn request(session: &str, isolation: Isolation) -> SandboxRequest {
        let mut runtime = RuntimeSpec::named("rt");
        runtime.isolation = isolation;
        SandboxRequest {
            session_id: session.into(),
            runtime,
            uid_slot: 0,
        }
    }

    #[tokio::test]
    async fn sessions_go_to_the_driver_of_their_runtime() {
        let ns = Arc::new(Fake {
            name: "ns",
            ..Fake::default()
        });
        let vm = Arc::new(Fake {
            name: "vm",
            ..Fake::default()
        });
        let d = Drivers::new(ns.clone(), Ok(vm.clone()));
        d.start(&request("a", Isolation::Microvm)).await.unwrap();
        d.start(&request("b", Isolation::Namespace)).await.unwrap();
        assert_eq!(vm.starts.load(Ordering::SeqCst), 1);
        assert_eq!(ns.starts.load(Ordering::SeqCst), 1);
        assert!(d.is_alive("a").await);
        assert_eq!(vm.alive_checks.load(Ordering::SeqCst), 1);
        assert_eq!(ns.alive_checks.load(Ordering::SeqCst), 0);
        // A stop reaches every driver (a leftover may belong to either) and forgets.
        d.stop("a").await.unwrap();
        assert_eq!(vm.stops.load(Ordering::SeqCst), 1);
        assert_eq!(ns.stops.load(Ordering::SeqCst), 1);
        assert!(d.is_alive("a").await);
        assert_eq!(
            ns.alive_checks.load(Ordering::SeqCst),
            1,
            "forgotten → default"
        );
        assert_eq!(
            d.leftovers().await,
            ["ns-leftover", "shared", "vm-leftover"]
        );
    }

    #[tokio::test]
    async fn a_missing_microvm_driver_is_a_clear_invalid_runtime() {
        let ns = Arc::new(Fake {
            name: "ns",
            ..Fake::default()
        });
        let d = Drivers::new(ns, Err("qemu-system-x86_64 is not installed".into()));
        let err = d
            .validate(&request("a", Isolation::Microvm).runtime)
            .unwrap_err();
        match err {
            DriverError::InvalidRuntime { field, message } => {
                assert_eq!(field, "isolation");
                assert!(message.contains("not installed"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(d.start(&request("a", Isolation::Microvm)).await.is_err());
        assert_eq!(d.name(), "namespace");
    }

    fn pair(vm_fast: bool) -> (Arc<Fake>, Arc<Fake>) {
        let ns = Arc::new(Fake {
            name: "ns",
            ..Fake::default()
        });
        let vm = Arc::new(Fake {
            name: "vm",
            fast: vm_fast,
            ..Fake::default()
        });
        (ns, vm)
    }

    #[tokio::test]
    async fn auto_is_a_microvm_only_where_that_driver_is_fast() {
        let (ns, vm) = pair(true);
        let d = Drivers::new(ns.clone(), Ok(vm.clone()));
        d.start(&request("a", Isolation::Auto)).await.unwrap();
        assert_eq!(vm.starts.load(Ordering::SeqCst), 1);
        assert!(d.is_alive("a").await);
        assert_eq!(
            vm.alive_checks.load(Ordering::SeqCst),
            1,
            "remembered as microvm"
        );

        let (ns, vm) = pair(false);
        let d = Drivers::new(ns.clone(), Ok(vm.clone()));
        d.start(&request("a", Isolation::Auto)).await.unwrap();
        assert_eq!(
            (
                ns.starts.load(Ordering::SeqCst),
                vm.starts.load(Ordering::SeqCst)
            ),
            (1, 0)
        );

        let (ns, _) = pair(true);
        let d = Drivers::new(ns.clone(), Err("no qemu".into()));
        d.start(&request("a", Isolation::Auto)).await.unwrap();
        assert_eq!(ns.starts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_pinned_default_decides_auto_but_not_explicit_runtimes() {
        let (ns, vm) = pair(false);
        let d = Drivers::new(ns.clone(), Ok(vm.clone())).with_default(Isolation::Microvm);
        d.start(&request("a", Isolation::Auto)).await.unwrap();
        d.start(&request("b", Isolation::Namespace)).await.unwrap();
        assert_eq!(
            (
                ns.starts.load(Ordering::SeqCst),
                vm.starts.load(Ordering::SeqCst)
            ),
            (1, 1)
        );

        let (ns, vm) = pair(true);
        let d = Drivers::new(ns.clone(), Ok(vm.clone())).with_default(Isolation::Namespace);
        d.start(&request("a", Isolation::Auto)).await.unwrap();
        d.start(&request("b", Isolation::Microvm)).await.unwrap();
        assert_eq!(
            (
                ns.starts.load(Ordering::SeqCst),
                vm.starts.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
    }
}
