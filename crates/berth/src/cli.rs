//! Command-line syntax. Each subcommand's behaviour lives in `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::units::{parse_duration, parse_size};

/// Berth: every AI coding agent session gets its own isolated machine with a persistent
/// workspace, a shell and deterministic command execution.
///
/// Start a server with `berth server`, then run commands in sessions, which are created
/// on first use:  berth exec --session my-task -- uname -a
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the CLI finds the server.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Server URL.
    #[arg(
        long,
        env = "BERTH_URL",
        default_value = "http://127.0.0.1:7878",
        global = true
    )]
    pub url: String,
    /// API token; when unset, read from <data-dir>/admin.token.
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Data dir of a local server, used to find admin.token.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = crate::cmd::DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Berth server (API, sessions, sandboxes).
    Server(ServerArgs),
    /// Run a command in a session's sandbox (the session is created on first use).
    Exec(ExecArgs),
    /// Copy files or directories between this machine and a session: LOCAL S:PATH or S:PATH LOCAL.
    Cp(CpArgs),
    /// Create, list, show and delete runtimes (sandbox configurations).
    #[command(subcommand)]
    Runtime(RuntimeCmd),
    /// Create, list, show, stop and delete sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// List, kill and fetch recordings of a session's interactive shells.
    #[command(subcommand)]
    Shell(ShellCmd),
    /// Build microVM images (guest kernel, initramfs, root filesystem).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Create, list and delete access keys: the AWS-style key pairs that boto3 and the
    /// AgentCore SDKs sign requests with (SigV4). Needs the admin token.
    #[command(subcommand)]
    AccessKey(AccessKeyCmd),
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build a microVM image, or find it up to date.
    #[command(long_about = IMAGE_BUILD_ABOUT)]
    Build(ImageBuildArgs),
}

const IMAGE_BUILD_ABOUT: &str = "\
Build a microVM image into <data-dir>/images/<name>/, or find it up to date.

An image is three files and a manifest.json that lists them with their SHA-256:
  vmlinux         the guest kernel: Debian's linux-image-cloud-amd64 (the concrete
                  package it depends on), fetched with `apt-get download`, unpacked
                  with `dpkg-deb -x` (never installed on this host), decompressed
                  out of vmlinuz
  initramfs.cpio.lz4
                  newc cpio, lz4-compressed (legacy frame, as `lz4 -l`): /init = this
                  berth binary (debug sections stripped unless --no-strip), the shared
                  libraries it needs, the virtio and overlay kernel modules in
                  /lib/modules/berth/ with their load order in /lib/modules/berth/order
  rootfs.ext4     read-only ext4 (label berth-root) made from --from:
                  host  the host's /usr, /bin, /sbin, /lib*, /etc, with the same /etc
                        secrets masked as in namespace sandboxes (shadow, sudoers, ssh
                        host keys, anything not world-readable), minus the default
                        excludes; empty /root, /home, /tmp, /var/tmp, /mnt/workspace...
                  DIR   that directory as /, e.g. a debootstrap tree

The build is skipped, in well under a second, when nothing changed: the kernel
package, this binary and its libraries, and the rootfs source (paths, sizes, modes,
owners and times, not contents) hash as before. Downloads and extracted kernels are
cached in <data-dir>/images/cache/ (safe to delete). A killed build leaves no
half-written image: everything is built in a temp dir and swapped into place.

Needs root: the rootfs is assembled with bind mounts in a private mount namespace,
which nothing outside the build sees.";

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// Root filesystem source: `host`, or a directory to use as the guest's `/`.
    #[arg(long, default_value = "host", value_name = "host|DIR")]
    pub from: String,
    /// Image name [default: `host`, or for a DIR `<dir name>-<hash of its path>`, the
    /// name the microVM driver looks up for a runtime with `--image DIR`].
    #[arg(long)]
    pub name: Option<String>,
    /// Leave this path of the image empty (a directory) or zero-length (a file);
    /// repeatable, e.g. --exclude /usr/lib/jvm.
    #[arg(long, value_name = "PATH")]
    pub exclude: Vec<String>,
    /// With --from host, keep what is excluded by default: /usr/lib/google-cloud-sdk,
    /// /usr/share/{doc,man,info}, /usr/lib/debug.
    #[arg(long)]
    pub no_default_excludes: bool,
    /// Copy the berth binary to /init as is, debug sections included.
    #[arg(long)]
    pub no_strip: bool,
    /// Rebuild even if the inputs are unchanged.
    #[arg(long)]
    pub force: bool,
    /// Berth's data dir; the image goes to <data-dir>/images/<name>/.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = crate::cmd::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ShellCmd {
    /// List the session's shells.
    List {
        session: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Kill a shell.
    Kill {
        session: String,
        shell: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a shell's asciicast v2 recording (play it with `asciinema play`).
    Record {
        session: String,
        shell: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Where Berth keeps its state, workspaces and sockets.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = crate::cmd::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "BERTH_LISTEN", default_value = "127.0.0.1:7878")]
    pub listen: String,
    /// Most sandboxes running at once; more requests get HTTP 429.
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Delete stopped sessions (workspace included) inactive for this long.
    #[arg(long, default_value = "14d", value_parser = parse_duration)]
    pub retention: u64,
    /// First host uid/gid of the ranges that sandbox users map to.
    #[arg(long, default_value_t = 1_000_000)]
    pub uid_base: u32,
    /// Most interactive shells per session; more get HTTP 429.
    #[arg(long, default_value_t = 10)]
    pub max_shells: usize,
    /// Data dir whose `images/` holds the microVM guest images made by `berth image
    /// build` (default: --data-dir). Lets several servers share one set of images.
    #[arg(long, value_name = "DIR")]
    pub guest_images: Option<PathBuf>,
    /// How microVMs run: `auto` probes KVM by booting the guest once and falls back to
    /// `tcg` (software emulation: development and tests only) when KVM cannot.
    #[arg(long, value_enum, default_value = "auto")]
    pub microvm_accel: AccelArg,
    /// How the server talks to a microVM's guest agent: `auto` uses vsock where the host
    /// kernel offers `/dev/vhost-vsock`, else a virtio-serial port; `vhost-user-vsock`
    /// (experimental) runs a `vhost-device-vsock` daemon per VM (`cargo install
    /// vhost-device-vsock`) for vsock without the kernel's vhost-vsock.
    #[arg(long, value_enum, default_value = "auto")]
    pub microvm_channel: ChannelArg,
    /// The `vhost-device-vsock` binary for `--microvm-channel vhost-user-vsock`
    /// (default: found on PATH).
    #[arg(long, value_name = "PATH")]
    pub vhost_device_vsock: Option<std::path::PathBuf>,
    /// What runtimes created without `--isolation` (isolation `auto`) get: `auto` picks
    /// `microvm` when KVM really boots the guest here and a guest image is built, else
    /// `namespace`; `microvm` pins microVMs even under TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub default_isolation: IsolationArg,
    /// AWS region in the ARNs of AgentCore runtimes (`arn:aws:bedrock-agentcore:REGION:…`);
    /// AgentCore clients must be configured with the same region.
    #[arg(long, default_value = berth_server::agentcore::DEFAULT_REGION, help_heading = "AgentCore")]
    pub region: String,
    /// Twelve-digit account id in the ARNs of AgentCore runtimes.
    #[arg(long, default_value = berth_server::agentcore::DEFAULT_ACCOUNT_ID, help_heading = "AgentCore")]
    pub account_id: String,
    /// Object store that AgentCore code zips are read from, one directory per bucket:
    /// `s3://BUCKET/KEY` is DIR/BUCKET/KEY [default: <data-dir>/buckets].
    #[arg(long, value_name = "DIR", help_heading = "AgentCore")]
    pub object_store: Option<PathBuf>,
    /// Host directory mounted (read-write) where an AgentCore runtime asks for this EFS or
    /// S3 Files access point in `filesystemConfigurations`; repeatable.
    #[arg(long, value_name = "ARN=DIR", value_parser = berth_server::agentcore::parse_shared_dir, help_heading = "AgentCore")]
    pub shared_dir: Vec<(String, PathBuf)>,
    /// Cache of AgentCore container images, one unpacked rootfs per image digest
    /// [default: <data-dir>-oci, beside the data dir; never inside it].
    #[arg(long, value_name = "DIR", help_heading = "AgentCore")]
    pub oci_cache: Option<PathBuf>,
    /// Registry credentials for image pulls: a Docker config.json (`auths`, as `docker
    /// login` writes it), read at every pull. Without it, pulls are anonymous.
    #[arg(long, value_name = "FILE", help_heading = "AgentCore")]
    pub registry_config: Option<PathBuf>,
    /// Pull from this registry (HOST for any port, or HOST:PORT) over plain HTTP;
    /// repeatable. Loopback registries (127.0.0.1, ::1, localhost) always are.
    #[arg(long, value_name = "HOST", help_heading = "AgentCore")]
    pub insecure_registry: Vec<String>,
    /// Print what this host supports (drivers, KVM or TCG) and exit.
    #[arg(long)]
    pub info: bool,
    /// Serve HTTPS with this PEM certificate chain (leaf first) instead of a generated
    /// certificate; needs --tls-key.
    ///
    /// The --listen port serves plain HTTP and HTTPS alike (told apart by the first byte
    /// of each connection; ALPN h2 and http/1.1). Without --tls-cert, the first start
    /// generates a CA in <data-dir>/tls/ (ca.pem, key ca.key) and a server certificate
    /// signed by it (server.pem, server.key) for localhost, 127.0.0.1, ::1, this host's
    /// name and every --tls-san. Later starts reuse them, re-issuing the server
    /// certificate from the same CA when the names change or it expires within 30 days,
    /// so clients keep trusting ca.pem: `curl --cacert <data-dir>/tls/ca.pem`,
    /// AWS_CA_BUNDLE=<data-dir>/tls/ca.pem for boto3 and the AWS SDKs.
    #[arg(long, value_name = "PEM", requires = "tls_key", help_heading = "HTTPS")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_cert",
        help_heading = "HTTPS"
    )]
    pub tls_key: Option<PathBuf>,
    /// Another DNS name (`*.` wildcards allowed) or IP address the generated server
    /// certificate covers; repeatable.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "tls_cert",
        help_heading = "HTTPS"
    )]
    pub tls_san: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelArg {
    Auto,
    Serial,
    Vsock,
    VhostUserVsock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Session to run in; created with --runtime if it does not exist.
    #[arg(long, short = 's')]
    pub session: String,
    /// Runtime for a new session.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Working directory inside the sandbox (default: the workspace).
    #[arg(long, short = 'w')]
    pub cwd: Option<String>,
    /// Extra environment variable (repeatable).
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Kill the command (its whole process group) after this long, e.g. 30s.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<u64>,
    /// Read standard input to the end and pass it to the command.
    #[arg(long, short = 'i', conflicts_with = "it")]
    pub stdin: bool,
    /// Interactive shell: attach this terminal to a shell in the session (created if
    /// needed; CMD, if given, is the shell's program). Survives dropped connections;
    /// detach with the detach keys and reattach later by shell id.
    #[arg(long = "it", alias = "interactive-tty")]
    pub it: bool,
    /// With --it: the shell to attach to or create (generated when omitted).
    #[arg(long, requires = "it")]
    pub shell_id: Option<String>,
    /// With --it: attach read-only, watching someone else's shell.
    #[arg(long, requires = "it")]
    pub watch: bool,
    /// With --it: keys that detach and leave the shell running, comma-separated
    /// (`ctrl-X` or a single character).
    #[arg(long, default_value = "ctrl-],d", requires = "it")]
    pub detach_keys: String,
    #[command(flatten)]
    pub remote: Remote,
    /// The command and its arguments.
    #[arg(last = true, required_unless_present = "it", value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// LOCAL path or SESSION:PATH.
    pub src: String,
    /// LOCAL path or SESSION:PATH.
    pub dst: String,
    #[command(flatten)]
    pub remote: Remote,
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCmd {
    /// Create a runtime.
    Create(RuntimeCreateArgs),
    /// List runtimes.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one runtime as JSON.
    Show {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a runtime that no session uses.
    Delete {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum IsolationArg {
    Auto,
    Namespace,
    Microvm,
}

impl From<IsolationArg> for berth_api::Isolation {
    fn from(arg: IsolationArg) -> Self {
        match arg {
            IsolationArg::Auto => berth_api::Isolation::Auto,
            IsolationArg::Namespace => berth_api::Isolation::Namespace,
            IsolationArg::Microvm => berth_api::Isolation::Microvm,
        }
    }
}

#[derive(Debug, Args)]
pub struct RuntimeCreateArgs {
    pub name: String,
    /// `host` (host system dirs read-only, secrets masked) or a rootfs directory.
    #[arg(long, default_value = "host")]
    pub image: String,
    /// How sessions are isolated: `namespace` (Linux namespaces, shared kernel),
    /// `microvm` (one QEMU microVM per session with its own kernel; build its guest
    /// image first with `berth image build --from host|DIR` on the server) or `auto`
    /// (the server's default: microvm where KVM works and an image is built).
    #[arg(long, value_enum, default_value = "auto")]
    pub isolation: IsolationArg,
    /// Where the persistent workspace is mounted inside the sandbox.
    #[arg(long, default_value = "/mnt/workspace")]
    pub workspace_path: String,
    /// Workspace quota, e.g. 10G.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub workspace_size: u64,
    /// Extra host directory, SRC:DST[:ro] (at most 5).
    #[arg(long, value_name = "SRC:DST[:ro]")]
    pub mount: Vec<String>,
    /// Environment variable for every process, K=V (repeatable).
    #[arg(long, value_name = "K=V")]
    pub env: Vec<String>,
    /// CPU limit in cores, e.g. 1.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit, e.g. 2G.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub memory: u64,
    /// Process limit.
    #[arg(long, default_value_t = 1024)]
    pub pids: u64,
    /// Stop the sandbox after this long without activity.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub idle_timeout: u64,
    /// Stop the sandbox this long after it started.
    #[arg(long, default_value = "8h", value_parser = parse_duration)]
    pub max_lifetime: u64,
    #[command(flatten)]
    pub remote: Remote,
}

#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Create a session and start its sandbox.
    Create {
        /// Session id (generated when omitted).
        id: Option<String>,
        #[arg(long)]
        runtime: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List sessions with state, usage and last activity.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one session as JSON.
    Show {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop the session's sandbox; the workspace stays and the next command resumes it.
    Stop {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete the session and its workspace.
    Delete {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessKeyCmd {
    /// Create an access key and print its secret, which is never shown again.
    Create {
        /// A label for people, e.g. who or what uses the key.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List access keys: id, name, when created and last used (never the secrets).
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete an access key; requests signed with it are refused from then on.
    Delete {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}
