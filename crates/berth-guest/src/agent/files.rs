//! File operations: read (plain or tar), write (atomic file or tar unpack), stat, list.
//!
//! Filesystem work runs on blocking threads; bytes cross to and from the gRPC streams
//! through small bounded channels, so memory stays bounded in both directions.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::check_path;
use crate::proto::{write_file_input, Chunk, FileInfo, WriteFileInput, WriteTarget};

/// Largest data chunk sent by `ReadFile`.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// Chunks queued towards the host (or towards the writer thread).
const QUEUE: usize = 4;

pub(crate) type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;
type ChunkSender = mpsc::Sender<Result<Chunk, Status>>;

/// Map an I/O error on `path` to a status whose message names the operation and path.
pub(crate) fn io_status(what: &str, path: &Path, err: io::Error) -> Status {
    use io::ErrorKind as K;
    let msg = format!("{what} {}: {err}", path.display());
    match err.kind() {
        K::NotFound => Status::not_found(msg),
        K::PermissionDenied | K::ReadOnlyFilesystem => Status::permission_denied(msg),
        K::AlreadyExists => Status::already_exists(msg),
        K::InvalidInput | K::InvalidData | K::IsADirectory | K::NotADirectory => {
            Status::invalid_argument(msg)
        }
        K::DirectoryNotEmpty => Status::failed_precondition(msg),
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Status::resource_exhausted(msg),
        _ => Status::internal(msg),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| Status::internal(format!("file task failed: {err}")))?
}

pub(crate) async fn read_file(path: String, tar: bool) -> Result<ChunkStream, Status> {
    let path = check_path(&path)?.to_path_buf();
    let (tx, rx) = mpsc::channel(QUEUE);
    if tar {
        let name = path
            .file_name()
            .ok_or_else(|| Status::invalid_argument("cannot tar `/`; name a directory below it"))?
            .to_owned();
        let meta = fs::symlink_metadata(&path).map_err(|e| io_status("cannot read", &path, e))?;
        tokio::task::spawn_blocking(move || {
            if let Err(status) = write_tar(&path, Path::new(&name), &meta, tx.clone()) {
                let _ = tx.blocking_send(Err(status));
            }
        });
    } else {
        let file = blocking({
            let path = path.clone();
            move || {
                let meta = fs::metadata(&path).map_err(|e| io_status("cannot read", &path, e))?;
                if meta.is_dir() {
                    return Err(Status::invalid_argument(format!(
                        "{} is a directory; read it with tar=true",
                        path.display()
                    )));
                }
                if !meta.is_file() {
                    return Err(Status::invalid_argument(format!(
                        "{} is not a regular file",
                        path.display()
                    )));
                }
                File::open(&path).map_err(|e| io_status("cannot open", &path, e))
            }
        })
        .await?;
        tokio::task::spawn_blocking(move || {
            if let Err(status) = send_file(&path, file, &tx) {
                let _ = tx.blocking_send(Err(status));
            }
        });
    }
    Ok(Box::pin(ReceiverStream::new(rx)))
}

fn send_file(path: &Path, mut file: File, tx: &ChunkSender) -> Result<(), Status> {
    let mut buf = BytesMut::new();
    loop {
        buf.resize(READ_CHUNK, 0);
        let n = loop {
            match file.read(&mut buf) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(io_status("cannot read", path, err)),
            }
        };
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        let data = buf.split().freeze();
        if tx.blocking_send(Ok(Chunk { data })).is_err() {
            // The host went away.
            return Ok(());
        }
    }
}

/// A `Write` that cuts what it is given into chunks for the host.
struct ChunkWriter {
    buf: BytesMut,
    tx: ChunkSender,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        self.tx
            .blocking_send(Ok(Chunk { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(READ_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == READ_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

fn write_tar(path: &Path, name: &Path, meta: &fs::Metadata, tx: ChunkSender) -> Result<(), Status> {
    let writer = ChunkWriter {
        buf: BytesMut::with_capacity(READ_CHUNK),
        tx,
    };
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    let res = if meta.is_dir() {
        builder.append_dir_all(name, path)
    } else {
        builder.append_path_with_name(path, name)
    };
    res.map_err(|e| io_status("cannot archive", path, e))?;
    let mut writer = builder
        .into_inner()
        .map_err(|e| io_status("cannot archive", path, e))?;
    writer
        .flush()
        .map_err(|e| io_status("cannot archive", path, e))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) async fn write_file(mut input: Streaming<WriteFileInput>) -> Result<u64, Status> {
    let target: WriteTarget = match input.message().await? {
        Some(WriteFileInput {
            kind: Some(write_file_input::Kind::Target(target)),
        }) => target,
        _ => {
            return Err(Status::invalid_argument(
                "the first write_file message must be `target`",
            ))
        }
    };
    let path = check_path(&target.path)?.to_path_buf();
    let target_path = path.clone();
    let (tx, rx) = mpsc::channel::<Upload>(QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        if target.tar {
            unpack(&path, ChannelReader::new(rx))
        } else {
            let mode = if target.mode == 0 {
                0o644
            } else {
                target.mode & 0o7777
            };
            write_atomic(&path, mode, rx)
        }
    });
    let mut total = 0u64;
    let mut worker = Some(worker);
    loop {
        let kind = match input.message().await {
            Ok(Some(msg)) => msg.kind,
            // Also what a cancelled call looks like (tonic maps the reset to a clean
            // end), hence the explicit `end`. Dropping `tx` makes the worker discard.
            Ok(None) => {
                tracing::debug!(path = %target_path.display(), "upload ended without `end`");
                return Err(Status::aborted(format!(
                    "upload to {} ended without `end`; nothing was written",
                    target_path.display()
                )));
            }
            Err(status) => {
                tracing::debug!(path = %target_path.display(), "upload failed: {status}");
                return Err(status);
            }
        };
        match kind {
            Some(write_file_input::Kind::Data(data)) => {
                total += data.len() as u64;
                if worker.is_some() && tx.send(Upload::Data(data)).await.is_err() {
                    // The worker stopped early: an error, or a tar archive that ended
                    // before the stream did. Then the rest is only counted.
                    finish(worker.take()).await?;
                }
            }
            Some(write_file_input::Kind::End(_)) => {
                tracing::debug!(path = %target_path.display(), total, "upload complete");
                let _ = tx.send(Upload::End).await;
                break;
            }
            Some(write_file_input::Kind::Target(_)) | None => {
                return Err(Status::invalid_argument(
                    "only `data` and `end` may follow the write_file target",
                ))
            }
        }
    }
    drop(tx);
    finish(worker).await?;
    Ok(total)
}

async fn finish(worker: Option<tokio::task::JoinHandle<Result<(), Status>>>) -> Result<(), Status> {
    match worker {
        Some(worker) => worker
            .await
            .map_err(|err| Status::internal(format!("write task failed: {err}")))?,
        None => Ok(()),
    }
}

/// What the async side hands the writer thread. The sender being dropped without `End`
/// means the upload was cancelled: nothing is committed.
enum Upload {
    Data(Bytes),
    End,
}

fn interrupted(path: &Path) -> Status {
    Status::aborted(format!("upload to {} was interrupted", path.display()))
}

/// Write a plain file: temp file in the same directory, fsync, rename over the target.
fn write_atomic(path: &Path, mode: u32, mut rx: mpsc::Receiver<Upload>) -> Result<(), Status> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Status::invalid_argument("cannot write to `/`"));
    };
    fs::create_dir_all(dir).map_err(|e| io_status("cannot create directory", dir, e))?;
    let temp = dir.join(format!(
        ".{}.berth-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| io_status("cannot create", &temp, e))?;
        loop {
            match rx.blocking_recv() {
                Some(Upload::Data(data)) => file
                    .write_all(&data)
                    .map_err(|e| io_status("cannot write", path, e))?,
                Some(Upload::End) => break,
                None => return Err(interrupted(path)),
            }
        }
        // The umask applied at creation; the host asked for this exact mode.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_status("cannot chmod", path, e))?;
        file.sync_all()
            .map_err(|e| io_status("cannot sync", path, e))?;
        fs::rename(&temp, path).map_err(|e| io_status("cannot replace", path, e))?;
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&temp);
    }
    res
}

/// Unpack a tar stream into `dir`. The tar crate refuses entries that would land outside
/// it (`..`, absolute paths, writes through symlinks pointing out).
fn unpack(dir: &Path, reader: ChannelReader) -> Result<(), Status> {
    let cancelled = reader.cancelled.clone();
    fs::create_dir_all(dir).map_err(|e| io_status("cannot create directory", dir, e))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    archive.unpack(dir).map_err(|e| {
        if cancelled.load(Ordering::Acquire) {
            interrupted(dir)
        } else {
            io_status("cannot unpack into", dir, e)
        }
    })
}

/// A `Read` over chunks arriving from the async side.
struct ChannelReader {
    rx: mpsc::Receiver<Upload>,
    current: Bytes,
    cancelled: Arc<AtomicBool>,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Upload>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
            cancelled: Arc::default(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Upload::Data(data)) => self.current = data,
                Some(Upload::End) => return Ok(0),
                None => {
                    self.cancelled.store(true, Ordering::Release);
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "upload interrupted",
                    ));
                }
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

pub(crate) fn file_info(path: &Path, name: String) -> Result<FileInfo, Status> {
    let meta = fs::symlink_metadata(path).map_err(|e| io_status("cannot stat", path, e))?;
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "other"
    };
    let modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64);
    Ok(FileInfo {
        name,
        kind: kind.to_string(),
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        modified_ms,
    })
}

pub(crate) async fn stat(path: String) -> Result<FileInfo, Status> {
    let path: PathBuf = check_path(&path)?.to_path_buf();
    blocking(move || {
        let name = path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
        file_info(&path, name)
    })
    .await
}

pub(crate) async fn list_dir(path: String) -> Result<Vec<FileInfo>, Status> {
    let path: PathBuf = check_path(&path)?.to_path_buf();
    blocking(move || {
        let entries = fs::read_dir(&path).map_err(|e| io_status("cannot list", &path, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_status("cannot list", &path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match file_info(&entry.path(), name) {
                Ok(info) => out.push(info),
                // Removed between readdir and lstat: it is simply not there any more.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    })
    .await
}
