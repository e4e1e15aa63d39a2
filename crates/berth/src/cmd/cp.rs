//! `berth cp`: files and directories between this machine and a session.
//!
//! Directories travel as tar archives (the guest packs and unpacks inside the sandbox).
//! Like `cp`/`docker cp`: copying onto an existing directory puts the source inside it.

use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use berth_client::{Client, ClientError};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::cli::CpArgs;
use crate::cmd::{client, explain};

enum End {
    Local(PathBuf),
    Remote { session: String, path: String },
}

/// `SESSION:/abs/path` is remote; anything else is a local path.
fn parse_end(s: &str) -> anyhow::Result<End> {
    if let Some((session, path)) = s.split_once(':') {
        if berth_api::validate::id("session", session).is_ok() && !session.contains('/') {
            if !path.starts_with('/') {
                anyhow::bail!("{s:?}: the path after SESSION: must be absolute, e.g. {session}:/mnt/workspace/file");
            }
            return Ok(End::Remote {
                session: session.to_string(),
                path: path.to_string(),
            });
        }
    }
    Ok(End::Local(PathBuf::from(s)))
}

pub async fn run(args: CpArgs) -> anyhow::Result<()> {
    let c = client(&args.remote)?;
    match (parse_end(&args.src)?, parse_end(&args.dst)?) {
        (End::Local(src), End::Remote { session, path }) => upload(&c, &src, &session, &path).await,
        (End::Remote { session, path }, End::Local(dst)) => {
            download(&c, &session, &path, &dst).await
        }
        _ => anyhow::bail!("one side must be local and the other SESSION:PATH"),
    }
}

fn base_name(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

async fn remote_is_dir(c: &Client, session: &str, path: &str) -> anyhow::Result<bool> {
    match c.stat_file(session, path).await {
        Ok(info) => Ok(info.kind == "dir"),
        Err(ClientError::Api(e))
            if e.code == berth_api::ErrorCode::NotFound && !e.message.contains("session") =>
        {
            Ok(false)
        }
        Err(e) => Err(explain(e)),
    }
}

async fn upload(c: &Client, src: &Path, session: &str, path: &str) -> anyhow::Result<()> {
    let meta = tokio::fs::metadata(src)
        .await
        .with_context(|| format!("cannot read {}", src.display()))?;
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .context("the source needs a file name")?
        .to_string();
    let into_dir = path.ends_with('/') || remote_is_dir(c, session, path).await?;
    let target = if into_dir {
        format!("{}/{}", path.trim_end_matches('/'), name)
    } else {
        path.to_string()
    };
    let bytes = if meta.is_dir() {
        let src = src.to_path_buf();
        let archive =
            tokio::task::spawn_blocking(move || -> anyhow::Result<tempfile::NamedTempFile> {
                let tmp = tempfile::NamedTempFile::new()?;
                let mut builder = tar::Builder::new(tmp.reopen()?);
                builder.follow_symlinks(false);
                builder
                    .append_dir_all(".", &src)
                    .with_context(|| format!("cannot archive {}", src.display()))?;
                builder.finish()?;
                Ok(tmp)
            })
            .await??;
        let file = tokio::fs::File::open(archive.path()).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        c.write_file(session, &target, true, body)
            .await
            .map_err(explain)?
    } else {
        let file = tokio::fs::File::open(src)
            .await
            .with_context(|| format!("cannot open {}", src.display()))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        c.write_file(session, &target, false, body)
            .await
            .map_err(explain)?
    };
    eprintln!(
        "copied {} ({bytes} bytes) to {session}:{target}",
        src.display()
    );
    Ok(())
}

async fn download(c: &Client, session: &str, path: &str, dst: &Path) -> anyhow::Result<()> {
    let info = c.stat_file(session, path).await.map_err(explain)?;
    let name = base_name(path);
    let target = if dst.is_dir() {
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    if info.kind == "dir" {
        let tmp = tempfile::NamedTempFile::new()?;
        let mut out = tokio::fs::File::create(tmp.path()).await?;
        let mut stream = c.read_file(session, path, true).await.map_err(explain)?;
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(explain)?).await?;
        }
        out.flush().await?;
        let dest = target.clone();
        tokio::task::spawn_blocking(move || unpack_stripped(tmp.path(), &dest)).await??;
    } else {
        let tmp_path = target.with_extension("berth-partial");
        let mut out = tokio::fs::File::create(&tmp_path)
            .await
            .with_context(|| format!("cannot create {}", tmp_path.display()))?;
        let mut stream = c.read_file(session, path, false).await.map_err(explain)?;
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(explain)?).await?;
        }
        out.sync_all().await?;
        tokio::fs::rename(&tmp_path, &target).await?;
    }
    eprintln!("copied {session}:{path} to {}", target.display());
    Ok(())
}

/// Unpack a tar whose single top-level entry is the copied directory into `dest`,
/// dropping that top-level name. Entries that would escape `dest` are refused.
fn unpack_stripped(archive: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut ar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rest: PathBuf = path.components().skip(1).collect();
        if rest.as_os_str().is_empty() {
            continue;
        }
        if rest
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            anyhow::bail!(
                "archive entry {} would leave the destination",
                path.display()
            );
        }
        let out = dest.join(&rest);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry
            .unpack(&out)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
