//! `berth.*` options on the kernel command line: the only input `/init` gets from the
//! host before the guest protocol is up.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;

/// Where the workspace disk is mounted unless `berth.workspace_path` says otherwise.
const DEFAULT_WORKSPACE_PATH: &str = "/mnt/workspace";
/// `/proc/sys/kernel/hostname` holds at most 64 bytes.
const MAX_HOSTNAME: usize = 64;

/// What the host told the VM on the kernel command line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct VmOptions {
    /// `berth.workspace_path`: absolute, no `..`, not `/`.
    pub workspace_path: PathBuf,
    /// `berth.hostname` (default `berth`).
    pub hostname: String,
    /// `berth.overlay_size`: tmpfs `size=` of the writable root layer (default `50%` of
    /// RAM, tmpfs's own default, stated so it is visible in `/proc/mounts`).
    pub overlay_size: String,
    /// `berth.pids`: `pids.max` of the cgroup every command and shell runs in (the
    /// runtime's `pids` limit); `None`: no limit.
    pub pids: Option<NonZeroU64>,
    /// `berth.log`: the agent's log filter (what `BERTH_LOG` is elsewhere).
    pub log: Option<String>,
    /// `berth.env=<base64url(JSON object of strings)>`: the runtime's environment,
    /// overlaid on the defaults for every command (what the namespace driver puts in
    /// its container spec).
    pub env: BTreeMap<String, String>,
    /// `berth.mounts=<base64url(JSON array of {tag, target, read_only})>`: host
    /// directories shared over virtio-fs, each mounted at `target` by its `tag`.
    pub mounts: Vec<ShareMount>,
    /// `berth.channel`: how the host reaches the agent (default the virtio-serial port).
    pub channel: Channel,
    /// `berth.*` keys this version does not know; logged, not fatal, so a newer host can
    /// pass options an older guest ignores.
    pub unknown: Vec<String>,
}

/// The transport the guest protocol is served on (`berth.channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Channel {
    /// `berth.channel=serial`, or no `berth.channel`: the virtio-serial port named
    /// `berth.0` (`port.rs`).
    Serial,
    /// `berth.channel=vsock:PORT`: an `AF_VSOCK` listener on `PORT`, any CID
    /// (`vsock.rs`).
    Vsock { port: u32 },
}

/// Ports below 1024 are privileged, as in TCP (binding them needs
/// `CAP_NET_BIND_SERVICE`); `u32::MAX` is `VMADDR_PORT_ANY`, which no host can connect
/// to.
const VSOCK_PORTS: std::ops::RangeInclusive<u32> = 1024..=u32::MAX - 1;

/// One virtio-fs share the host attached (`-device vhost-user-fs-device,tag=…`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShareMount {
    pub tag: String,
    pub target: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// virtio-fs tags are at most 36 bytes (`struct virtio_fs_config`).
const MAX_TAG: usize = 36;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum CmdlineError {
    #[error("berth.workspace_path {0:?} must be absolute, without `..`, and not /")]
    WorkspacePath(String),
    #[error("berth.hostname {0:?} must be 1 to 64 bytes without whitespace or `/`")]
    Hostname(String),
    #[error("berth.overlay_size {0:?} must be digits followed by k, m, g or %")]
    OverlaySize(String),
    #[error("berth.pids {0:?} must be a positive decimal number")]
    Pids(String),
    #[error("berth.env is not base64url of a JSON object of strings: {0}")]
    Env(String),
    #[error("berth.env names an invalid variable {0:?}")]
    EnvName(String),
    #[error("berth.mounts is not base64url of a JSON array of mounts: {0}")]
    Mounts(String),
    #[error("berth.mounts has an invalid tag {0:?} (1 to 36 of a-z, 0-9, '-', '.')")]
    MountTag(String),
    #[error("berth.mounts target {0:?} must be absolute, without `..`, and not /")]
    MountTarget(String),
    #[error(
        "berth.channel {0:?} must be `serial` or `vsock:<port>` with a decimal port from 1024 \
         to 4294967294"
    )]
    Channel(String),
}

impl VmOptions {
    pub(super) fn parse(cmdline: &str) -> Result<VmOptions, CmdlineError> {
        let mut options = VmOptions {
            workspace_path: PathBuf::from(DEFAULT_WORKSPACE_PATH),
            hostname: "berth".to_string(),
            overlay_size: "50%".to_string(),
            pids: None,
            log: None,
            env: BTreeMap::new(),
            mounts: Vec::new(),
            channel: Channel::Serial,
            unknown: Vec::new(),
        };
        for word in words(cmdline) {
            let Some(rest) = word.strip_prefix("berth.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            match key {
                "workspace_path" => {
                    if !is_sandbox_path(Path::new(&value)) {
                        return Err(CmdlineError::WorkspacePath(value.to_string()));
                    }
                    options.workspace_path = PathBuf::from(value);
                }
                "hostname" => {
                    let ok = !value.is_empty()
                        && value.len() <= MAX_HOSTNAME
                        && !value.contains(|c: char| c.is_whitespace() || c == '/');
                    if !ok {
                        return Err(CmdlineError::Hostname(value.to_string()));
                    }
                    options.hostname = value.to_string();
                }
                "overlay_size" => {
                    // It becomes part of a mount option string: anything but a plain
                    // size could smuggle in other options.
                    let digits = value.trim_end_matches(['k', 'm', 'g', 'K', 'M', 'G', '%']);
                    let ok = !digits.is_empty()
                        && digits.len() + 1 >= value.len()
                        && digits.bytes().all(|b| b.is_ascii_digit());
                    if !ok {
                        return Err(CmdlineError::OverlaySize(value.to_string()));
                    }
                    options.overlay_size = value.to_string();
                }
                "pids" => {
                    // Written to `pids.max` as is: digits only.
                    let pids = value
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| value.parse::<NonZeroU64>().ok())
                        .flatten();
                    options.pids = Some(pids.ok_or_else(|| CmdlineError::Pids(value.to_string()))?);
                }
                "log" => options.log = Some(value.to_string()),
                "env" => options.env = parse_env(value)?,
                "mounts" => options.mounts = parse_mounts(value)?,
                "channel" => options.channel = parse_channel(value)?,
                _ => options.unknown.push(key.to_string()),
            }
        }
        Ok(options)
    }
}

/// Absolute, without `..`, and not `/` itself.
fn is_sandbox_path(path: &Path) -> bool {
    path.is_absolute()
        && path.components().all(|c| c != Component::ParentDir)
        && path.components().any(|c| matches!(c, Component::Normal(_)))
}

fn parse_channel(value: &str) -> Result<Channel, CmdlineError> {
    if value == "serial" {
        return Ok(Channel::Serial);
    }
    let port = value
        .strip_prefix("vsock:")
        .filter(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|port| port.parse::<u32>().ok())
        .filter(|port| VSOCK_PORTS.contains(port));
    match port {
        Some(port) => Ok(Channel::Vsock { port }),
        None => Err(CmdlineError::Channel(value.to_string())),
    }
}

fn parse_mounts(value: &str) -> Result<Vec<ShareMount>, CmdlineError> {
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| CmdlineError::Mounts(e.to_string()))?;
    let mounts: Vec<ShareMount> =
        serde_json::from_slice(&json).map_err(|e| CmdlineError::Mounts(e.to_string()))?;
    for m in &mounts {
        let tag_ok = !m.tag.is_empty()
            && m.tag.len() <= MAX_TAG
            && m.tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !tag_ok {
            return Err(CmdlineError::MountTag(m.tag.clone()));
        }
        if !is_sandbox_path(&m.target) {
            return Err(CmdlineError::MountTarget(m.target.display().to_string()));
        }
    }
    Ok(mounts)
}

fn parse_env(value: &str) -> Result<BTreeMap<String, String>, CmdlineError> {
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| CmdlineError::Env(e.to_string()))?;
    let env: BTreeMap<String, String> =
        serde_json::from_slice(&json).map_err(|e| CmdlineError::Env(e.to_string()))?;
    for (name, value) in &env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(CmdlineError::EnvName(name.clone()));
        }
    }
    Ok(env)
}

/// Split like the kernel does: on spaces outside double quotes, quotes removed. Words
/// after a lone `--` belong to init's argv, not to us.
fn words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    if word == "--" {
                        return words;
                    }
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word && word != "--" {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_without_berth_options() {
        let options = VmOptions::parse("console=ttyS0 panic=-1 quiet\n").unwrap();
        assert_eq!(options.workspace_path, Path::new("/mnt/workspace"));
        assert_eq!(options.hostname, "berth");
        assert_eq!(options.overlay_size, "50%");
        assert_eq!(options.log, None);
        assert_eq!(options.pids, None);
        assert!(options.env.is_empty());
        assert_eq!(options.channel, Channel::Serial);
        assert!(options.unknown.is_empty());
    }

    #[test]
    fn reads_berth_options_quotes_and_stops_at_dashdash() {
        let options = VmOptions::parse(
            "console=ttyS0 berth.workspace_path=\"/home/agent/work\" berth.hostname=my-task \
             berth.overlay_size=256m berth.log=debug berth.future=1 -- berth.hostname=no",
        )
        .unwrap();
        assert_eq!(options.workspace_path, Path::new("/home/agent/work"));
        assert_eq!(options.hostname, "my-task");
        assert_eq!(options.overlay_size, "256m");
        assert_eq!(options.log.as_deref(), Some("debug"));
        assert_eq!(options.unknown, vec!["future".to_string()]);
    }

    #[test]
    fn reads_the_environment() {
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let line = format!(
            "berth.env={}",
            encode(r#"{"GREETING":"hello world","PATH":"/opt/bin:/usr/bin"}"#)
        );
        let env = VmOptions::parse(&line).unwrap().env;
        assert_eq!(env["GREETING"], "hello world");
        assert_eq!(env["PATH"], "/opt/bin:/usr/bin");
        for bad in ["!!", &encode("[1]"), &encode(r#"{"A":1}"#)] {
            let err = VmOptions::parse(&format!("berth.env={bad}")).unwrap_err();
            assert!(matches!(err, CmdlineError::Env(_)), "{bad}: {err}");
        }
        for bad in [r#"{"":"x"}"#, r#"{"A=B":"x"}"#] {
            let err = VmOptions::parse(&format!("berth.env={}", encode(bad))).unwrap_err();
            assert!(matches!(err, CmdlineError::EnvName(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        for bad in ["rel", "/a/../b", "/", ""] {
            let err = VmOptions::parse(&format!("berth.workspace_path={bad}")).unwrap_err();
            assert_eq!(err, CmdlineError::WorkspacePath(bad.to_string()));
        }
        for bad in ["", "a/b", &"h".repeat(65)] {
            let err = VmOptions::parse(&format!("berth.hostname={bad}")).unwrap_err();
            assert_eq!(err, CmdlineError::Hostname(bad.to_string()));
        }
        for bad in ["", "m", "1,mode=777", "12mm", "1x"] {
            let err = VmOptions::parse(&format!("berth.overlay_size={bad}")).unwrap_err();
            assert_eq!(err, CmdlineError::OverlaySize(bad.to_string()));
        }
        assert!(VmOptions::parse("berth.overlay_size=75%").is_ok());
        assert!(VmOptions::parse("berth.overlay_size=1048576").is_ok());
    }

    #[test]
    fn reads_the_mounts() {
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let line = format!(
            "quiet berth.mounts={}",
            encode(
                r#"[{"tag":"berth-m0","target":"/mnt/ref","read_only":true},
                    {"tag":"berth-m1","target":"/data"}]"#
            )
        );
        let mounts = VmOptions::parse(&line).unwrap().mounts;
        assert_eq!(
            mounts,
            vec![
                ShareMount {
                    tag: "berth-m0".into(),
                    target: "/mnt/ref".into(),
                    read_only: true
                },
                ShareMount {
                    tag: "berth-m1".into(),
                    target: "/data".into(),
                    read_only: false
                },
            ]
        );
        for (bad, want) in [
            (r#"[{"tag":"Bad Tag","target":"/x"}]"#, "tag"),
            (r#"[{"tag":"","target":"/x"}]"#, "tag"),
            (r#"[{"tag":"m","target":"/a/../etc"}]"#, "target"),
            (r#"[{"tag":"m","target":"/"}]"#, "target"),
            (r#"[{"tag":"m","target":"rel"}]"#, "target"),
            (r#"[{"tag":"m","target":"/x","extra":1}]"#, "json"),
            (r#"{"tag":"m"}"#, "json"),
        ] {
            let err = VmOptions::parse(&format!("berth.mounts={}", encode(bad))).unwrap_err();
            let kind = match err {
                CmdlineError::MountTag(_) => "tag",
                CmdlineError::MountTarget(_) => "target",
                CmdlineError::Mounts(_) => "json",
                _ => "other",
            };
            assert_eq!(kind, want, "{bad}: {err}");
        }
    }

    #[test]
    fn reads_the_pids_limit() {
        let options = VmOptions::parse("quiet berth.pids=64").unwrap();
        assert_eq!(options.pids, NonZeroU64::new(64));
        for bad in ["", "0", "-1", "+5", "1k", "max", "18446744073709551616"] {
            let err = VmOptions::parse(&format!("berth.pids={bad}")).unwrap_err();
            assert_eq!(err, CmdlineError::Pids(bad.to_string()));
        }
    }

    #[test]
    fn reads_the_channel() {
        let channel = |line: &str| VmOptions::parse(line).map(|options| options.channel);
        assert_eq!(channel("quiet berth.channel=serial"), Ok(Channel::Serial));
        assert_eq!(
            channel("quiet berth.channel=vsock:1024"),
            Ok(Channel::Vsock { port: 1024 })
        );
        assert_eq!(
            channel("berth.channel=\"vsock:4294967294\""),
            Ok(Channel::Vsock { port: u32::MAX - 1 })
        );
        for bad in [
            "",
            "vsock",
            "vsock:",
            "vsock:1023",
            "vsock:0",
            "vsock:4294967295",
            "vsock:4294967296",
            "vsock:+2000",
            "vsock:-1",
            "vsock:0x400",
            "vsock:1024 ",
            "vsock:3:1024",
            "VSOCK:1024",
            "tcp:1024",
            "serial:0",
        ] {
            let err = channel(&format!("berth.channel=\"{bad}\"")).unwrap_err();
            assert_eq!(err, CmdlineError::Channel(bad.to_string()));
        }
    }
}
