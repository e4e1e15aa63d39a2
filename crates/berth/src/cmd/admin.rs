//! `berth runtime …` and `berth session …`.

use berth_api::{CreateSession, Mount, RuntimeSpec};

use crate::cli::{RuntimeCmd, RuntimeCreateArgs, SessionCmd};
use crate::cmd::{client, explain, parse_env};
use crate::units::{format_bytes, format_duration};

pub async fn runtime(cmd: RuntimeCmd) -> anyhow::Result<()> {
    match cmd {
        RuntimeCmd::Create(args) => {
            let c = client(&args.remote)?;
            let spec = spec_from(&args)?;
            let rt = c.create_runtime(&spec).await.map_err(explain)?;
            println!("created runtime {}", rt.spec.name);
        }
        RuntimeCmd::List { remote } => {
            let list = client(&remote)?.list_runtimes().await.map_err(explain)?;
            println!(
                "{:<20} {:<24} {:<9} {:>9} {:>9} {:>6} {:>6} {:>8}",
                "NAME", "IMAGE", "ISOLATION", "WORKSPACE", "MEMORY", "PIDS", "IDLE", "LIFETIME"
            );
            for rt in list {
                let s = rt.spec;
                println!(
                    "{:<20} {:<24} {:<9} {:>9} {:>9} {:>6} {:>6} {:>8}",
                    s.name,
                    s.image,
                    s.isolation.name(),
                    format_bytes(s.workspace_size),
                    format_bytes(s.memory),
                    s.pids,
                    format_duration(s.idle_timeout_s),
                    format_duration(s.max_lifetime_s)
                );
            }
        }
        RuntimeCmd::Show { name, remote } => {
            let rt = client(&remote)?.get_runtime(&name).await.map_err(explain)?;
            println!("{}", serde_json::to_string_pretty(&rt)?);
        }
        RuntimeCmd::Delete { name, remote } => {
            client(&remote)?
                .delete_runtime(&name)
                .await
                .map_err(explain)?;
            println!("deleted runtime {name}");
        }
    }
    Ok(())
}

fn spec_from(args: &RuntimeCreateArgs) -> anyhow::Result<RuntimeSpec> {
    let mounts = args
        .mount
        .iter()
        .map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            match parts.as_slice() {
                [src, dst] => Ok(Mount {
                    source: src.to_string(),
                    target: dst.to_string(),
                    read_only: false,
                }),
                [src, dst, "ro"] => Ok(Mount {
                    source: src.to_string(),
                    target: dst.to_string(),
                    read_only: true,
                }),
                [src, dst, "rw"] => Ok(Mount {
                    source: src.to_string(),
                    target: dst.to_string(),
                    read_only: false,
                }),
                _ => anyhow::bail!("--mount {m:?}: expected SRC:DST or SRC:DST:ro"),
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let image = if args.image == "host" {
        args.image.clone()
    } else {
        // Resolve relative paths here: the server needs an absolute directory.
        std::path::Path::new(&args.image)
            .canonicalize()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| args.image.clone())
    };
    Ok(RuntimeSpec {
        name: args.name.clone(),
        image,
        isolation: args.isolation.into(),
        workspace_path: args.workspace_path.clone(),
        workspace_size: args.workspace_size,
        mounts,
        env: parse_env(&args.env, "--env")?,
        cpus: args.cpus,
        memory: args.memory,
        pids: args.pids,
        idle_timeout_s: args.idle_timeout,
        max_lifetime_s: args.max_lifetime,
    })
}

pub async fn session(cmd: SessionCmd) -> anyhow::Result<()> {
    match cmd {
        SessionCmd::Create {
            id,
            runtime,
            remote,
        } => {
            let s = client(&remote)?
                .create_session(&CreateSession { id, runtime })
                .await
                .map_err(explain)?;
            println!("{}", s.id);
        }
        SessionCmd::List { remote } => {
            let list = client(&remote)?.list_sessions().await.map_err(explain)?;
            println!(
                "{:<24} {:<9} {:<14} {:>9} {:>10} {:>10} {:<20}",
                "SESSION", "STATE", "RUNTIME", "CPU", "PEAK MEM", "WORKSPACE", "LAST ACTIVITY"
            );
            for s in list {
                println!(
                    "{:<24} {:<9} {:<14} {:>8.2}s {:>10} {:>10} {:<20}",
                    s.id,
                    s.state.as_str(),
                    s.runtime,
                    s.usage.cpu_seconds,
                    format_bytes(s.usage.peak_memory_bytes),
                    format_bytes(s.usage.workspace_bytes),
                    ago(s.last_activity_ms)
                );
            }
        }
        SessionCmd::Show { id, remote } => {
            let s = client(&remote)?.get_session(&id).await.map_err(explain)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        SessionCmd::Stop { id, remote } => {
            client(&remote)?.stop_session(&id).await.map_err(explain)?;
            println!("stopped {id}; its workspace is kept and the next command resumes it");
        }
        SessionCmd::Delete { id, remote } => {
            client(&remote)?
                .delete_session(&id)
                .await
                .map_err(explain)?;
            println!("deleted {id} and its workspace");
        }
    }
    Ok(())
}

fn ago(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = ((now - ms) / 1000).max(0) as u64;
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}
