//! Files: byte streams between the client and the guest, confined to the sandbox's view
//! (the guest resolves paths inside the sandbox's own root).

use std::pin::Pin;

use berth_api::validate;
use berth_guest::proto::{PathRequest, ReadFileRequest, WriteTarget};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::sessions::BusyGuard;
use crate::{Core, CoreError};

/// File bytes (or a tar archive) coming out of a sandbox.
pub type ReadStream = Pin<Box<dyn Stream<Item = Result<Bytes, CoreError>> + Send>>;

pub use berth_api::FileInfo;

fn file_info(f: berth_guest::proto::FileInfo) -> FileInfo {
    FileInfo {
        name: f.name,
        kind: f.kind,
        size: f.size,
        mode: f.mode,
        modified_ms: f.modified_ms,
    }
}

impl Core {
    /// Stream a file, or a tar of a file or directory, out of the session's sandbox.
    pub async fn read_file(
        &self,
        session_id: &str,
        path: &str,
        tar: bool,
    ) -> Result<ReadStream, CoreError> {
        let (busy, mut guest) = self.file_guest(session_id, path).await?;
        let session = session_id.to_string();
        let mut chunks = guest
            .read_file(ReadFileRequest {
                path: path.to_string(),
                tar,
            })
            .await
            .map_err(|s| CoreError::guest(session_id, s))?
            .into_inner();
        // Fetch the first chunk now so that "not found" becomes a proper error response
        // instead of a broken stream.
        let first = chunks
            .message()
            .await
            .map_err(|s| CoreError::guest(session_id, s))?;
        let head = futures::stream::iter(first.map(|c| Ok(c.data)));
        let rest = futures::stream::unfold(
            (chunks, busy, session),
            |(mut chunks, busy, session)| async move {
                match chunks.message().await {
                    Ok(Some(c)) => Some((Ok(c.data), (chunks, busy, session))),
                    Ok(None) => None,
                    Err(s) => Some((Err(CoreError::guest(&session, s)), (chunks, busy, session))),
                }
            },
        );
        Ok(Box::pin(head.chain(rest)))
    }

    /// Write a file (or unpack a tar into a directory) in the session's sandbox,
    /// creating the session on first use. Returns the number of bytes written.
    pub async fn write_file<S>(
        &self,
        session_id: &str,
        path: &str,
        tar: bool,
        mode: u32,
        body: S,
    ) -> Result<u64, CoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        validate::sandbox_path("path", path)?;
        self.record_or_create(session_id, None).await?;
        let (slot, sandbox, _) = self.ensure_running(session_id).await?;
        let _busy = BusyGuard::new(slot);
        let target = WriteTarget {
            path: path.to_string(),
            tar,
            mode,
        };
        // A client body that fails midway must cancel the upload rather than end it
        // cleanly (which would commit a truncated file): on error the data stream stops
        // yielding forever and the select below drops the call.
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
        let data = futures::stream::unfold(
            (Box::pin(body), Some(failed_tx)),
            |(mut body, mut failed)| async move {
                match body.next().await {
                    Some(Ok(chunk)) => Some((chunk, (body, failed))),
                    Some(Err(e)) => {
                        if let Some(tx) = failed.take() {
                            let _ = tx.send(e);
                        }
                        std::future::pending().await
                    }
                    None => None,
                }
            },
        );
        let mut guest = sandbox.guest.clone();
        tokio::select! {
            written = berth_guest::client::write_file(&mut guest, target, data) => {
                written.map_err(|s| CoreError::guest(session_id, s))
            }
            Ok(err) = failed_rx => Err(CoreError::invalid("body", format!("upload interrupted: {err}"))),
        }
    }

    pub async fn stat_file(&self, session_id: &str, path: &str) -> Result<FileInfo, CoreError> {
        let (_busy, mut guest) = self.file_guest(session_id, path).await?;
        let info = guest
            .stat(PathRequest {
                path: path.to_string(),
            })
            .await
            .map_err(|s| CoreError::guest(session_id, s))?;
        Ok(file_info(info.into_inner()))
    }

    pub async fn list_dir(&self, session_id: &str, path: &str) -> Result<Vec<FileInfo>, CoreError> {
        let (_busy, mut guest) = self.file_guest(session_id, path).await?;
        let list = guest
            .list_dir(PathRequest {
                path: path.to_string(),
            })
            .await
            .map_err(|s| CoreError::guest(session_id, s))?;
        Ok(list
            .into_inner()
            .entries
            .into_iter()
            .map(file_info)
            .collect())
    }

    /// Checks shared by file reads of an existing session, then its guest (resuming the
    /// sandbox if needed) and a guard that keeps it from idling meanwhile.
    async fn file_guest(
        &self,
        session_id: &str,
        path: &str,
    ) -> Result<(BusyGuard, berth_guest::client::Guest), CoreError> {
        validate::id("session_id", session_id)?;
        validate::sandbox_path("path", path)?;
        self.record(session_id).await?;
        let (slot, sandbox, _) = self.ensure_running(session_id).await?;
        Ok((BusyGuard::new(slot), sandbox.guest.clone()))
    }
}
