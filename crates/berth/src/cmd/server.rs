use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use berth_core::{Core, CoreConfig};
use berth_server::tls::{self, CaState, CertSource, ServerState, Trust};
use berth_server::{AppState, Tokens};

use crate::cli::ServerArgs;

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let data_dir = &args.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict permissions of {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .context("cannot resolve the data dir")?;
    // Refuse now rather than fail every session's start later; `--info` only reports it.
    let unreachable = match berth_sandbox::namespace::check_data_dir(&data_dir) {
        Err(e) if !args.info => return Err(e.into()),
        result => result.err(),
    };

    let drivers = super::drivers::build(&args, &data_dir)?;
    if args.info {
        super::drivers::print_info(&drivers, &data_dir).await;
        if let Some(e) = unreachable {
            println!("data dir unusable: {e}; `berth server` refuses to start");
        }
        print_tls_info(&args, &data_dir);
        return Ok(());
    }
    if drivers.microvm.is_none() {
        tracing::info!(
            "microVM isolation unavailable: {}",
            drivers.microvm_missing.as_deref().unwrap_or_default()
        );
    }
    super::drivers::probe_in_background(&drivers);
    let driver = drivers.drivers;

    let tls = tls::setup(&tls_source(&args, &data_dir)).context("cannot set up HTTPS")?;
    if let Some(generated) = &tls.generated {
        let dir = tls::CertDir::in_data_dir(&data_dir);
        match generated.ca {
            CaState::Created => eprintln!("berth: created a CA in {}", dir.ca_cert().display()),
            CaState::Rebuilt => eprintln!(
                "berth: rebuilt {} from {}",
                dir.ca_cert().display(),
                dir.ca_key().display()
            ),
            CaState::Existing => {}
        }
        if let ServerState::Issued(why) = &generated.server {
            tracing::info!("issued {} from the CA: {why}", dir.server_cert().display());
        }
    }

    let store = berth_store::Store::open(&data_dir.join("state.db")).await?;
    let tokens = Arc::new(Tokens::default());
    let (token_path, created) =
        berth_server::ensure_admin_token(&store, &data_dir, &tokens, now_ms()).await?;
    let access_keys = Arc::new(berth_server::AccessKeys::new(store.clone(), &data_dir));
    let config = CoreConfig {
        max_sandboxes: args.max_sandboxes,
        retention: Duration::from_secs(args.retention),
        max_shells: args.max_shells,
        logs_dir: Some(data_dir.join("logs")),
        ..CoreConfig::default()
    };
    let core = Core::new(store.clone(), driver, config)
        .await
        .context("cannot start the core")?;
    let agentcore = agentcore(&args, &data_dir, &core, store).await?;
    let background = core.spawn_background();

    let addr: SocketAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not HOST:PORT", args.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr}; is another server running? (--listen picks another address)"
        )
    })?;
    let app = berth_server::app(AppState {
        core: core.clone(),
        tokens,
        access_keys,
        agentcore: Some(agentcore),
    });
    if created {
        eprintln!("berth: created the admin token in {}", token_path.display());
    } else {
        eprintln!("berth: admin token is in {}", token_path.display());
    }
    eprintln!(
        "berth: listening on http://{} (data dir {})",
        listener.local_addr()?,
        data_dir.display()
    );
    match &tls.trust {
        Trust::GeneratedCa(ca) => eprintln!(
            "berth: HTTPS on the same port; clients trust {} (AWS_CA_BUNDLE={0})",
            ca.display()
        ),
        Trust::Operator(cert) => {
            eprintln!("berth: HTTPS on the same port with {}", cert.display())
        }
    }

    // Stop the sandboxes before waiting for connections to drain: that ends every open
    // command stream, which graceful shutdown would otherwise wait for indefinitely.
    let stopping = core.clone();
    let shutdown = async move {
        shutdown_signal().await;
        background.abort();
        eprintln!("berth: stopping sandboxes");
        stopping.stop_all("server_stop").await;
    };
    // Without TCP_NODELAY, the small `started`/`exit` events of a short command sit
    // behind the client's delayed ACK (~40 ms per command).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Plain HTTP and HTTPS on the one port, told apart per connection.
    let listener =
        tls::SniffingListener::new(listener, tls.config).context("cannot listen for HTTPS")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")?;
    // Anything started while shutting down.
    core.stop_all("server_stop").await;
    Ok(())
}

/// Where the HTTPS certificate comes from: the operator's, or generated in the data dir.
fn tls_source(args: &ServerArgs, data_dir: &std::path::Path) -> CertSource {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => CertSource::Operator {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => CertSource::Generated {
            data_dir: data_dir.to_path_buf(),
            names: tls::default_names(&args.tls_san),
        },
    }
}

/// `berth server --info`: what clients trust for HTTPS.
fn print_tls_info(args: &ServerArgs, data_dir: &std::path::Path) {
    match tls_source(args, data_dir) {
        CertSource::Operator { cert, .. } => {
            println!("https: same port as http, certificate {}", cert.display())
        }
        CertSource::Generated { names, .. } => {
            let ca = tls::ca_path(data_dir);
            let made = if ca.exists() {
                ""
            } else {
                ", created on first start"
            };
            println!(
                "https: same port as http; clients trust {}{made} (AWS_CA_BUNDLE); names {}",
                ca.display(),
                names.join(", ")
            );
        }
    }
}

/// The AgentCore-compatible API's state, from the `--region`, `--account-id`,
/// `--object-store`, `--shared-dir`, `--oci-cache`, `--registry-config` and
/// `--insecure-registry` flags.
async fn agentcore(
    args: &ServerArgs,
    data_dir: &std::path::Path,
    core: &Core,
    store: berth_store::Store,
) -> anyhow::Result<berth_server::agentcore::AgentCore> {
    use berth_server::agentcore::{AgentCore, AgentCoreConfig};
    let mut config = AgentCoreConfig::new(data_dir);
    config.region = args.region.clone();
    config.account_id = args.account_id.clone();
    match &args.object_store {
        Some(dir) => config.object_store_dir = dir.clone(),
        None => std::fs::create_dir_all(&config.object_store_dir)
            .with_context(|| format!("cannot create {}", config.object_store_dir.display()))?,
    }
    for (arn, dir) in &args.shared_dir {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--shared-dir {arn}={}", dir.display()))?;
        config.shared_dirs.insert(arn.clone(), dir);
    }
    if let Some(dir) = &args.oci_cache {
        config.images.cache_dir = dir.clone();
    }
    config.images.registries.credentials = args.registry_config.clone();
    config.images.registries.insecure = args.insecure_registry.iter().cloned().collect();
    AgentCore::start(core.clone(), store, config)
        .await
        .context("cannot start the AgentCore API")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
