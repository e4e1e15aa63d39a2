//! The agent under test: a separate process (this test binary re-executed into its
//! `agent_process` test, or the real `berth guest` when `BERTH_GUEST_TEST_BIN` names the
//! binary), listening on a socket in a temp dir.
#![allow(dead_code)] // each test file uses a different part

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_guest::client::{connect_unix, Guest};

const LISTEN_ENV: &str = "BERTH_GUEST_TEST_LISTEN";

/// The body of each test file's `agent_process` test: serve when re-executed as the
/// agent, do nothing when run as a test.
pub fn agent_process_entry() {
    if let Some(listen) = std::env::var_os(LISTEN_ENV) {
        berth_guest::agent::cli_main(vec!["--listen".into(), listen]).unwrap();
    }
}

pub struct TestAgent {
    pub child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        Self::start_with(&[])
    }

    /// Start the agent under `wrapper` (e.g. `unshare ...`), or directly if it is empty.
    pub fn start_with(wrapper: &[&str]) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("guest.sock");
        let real = std::env::var_os("BERTH_GUEST_TEST_BIN");
        let exe = real
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::current_exe().unwrap());
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        if real.is_some() {
            cmd.arg("guest").arg("--listen").arg(&socket);
        } else {
            cmd.args([
                "--exact",
                "agent_process",
                "--nocapture",
                "--test-threads=1",
            ]);
        }
        let child = cmd
            .env(LISTEN_ENV, &socket)
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let begin = Instant::now();
        while !socket.exists() {
            assert!(
                begin.elapsed() < Duration::from_secs(60),
                "agent never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        TestAgent { child, dir, socket }
    }

    pub async fn connect(&self) -> Guest {
        connect_unix(&self.socket).await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A scratch path inside the test's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
