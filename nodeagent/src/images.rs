//! The image store: `PullImage` downloads over HTTP(S), verifies SHA-256 and publishes the
//! file under its final name only once complete and durable; `ListImages` lists it,
//! `DeleteImage` removes one.
//!
//! An image is named by its URL's path (without the host): `https://h/vmlinuz` is stored as
//! `vmlinuz`, `https://h/a/vmlinuz` as `a/vmlinuz` and `https://h/b/vmlinuz` as `b/vmlinuz`, so
//! two kernels of the same file name from different directories do not collide. The name
//! is what specs use (`"kernel": "a/vmlinuz"`, relative to the store). Each path segment is a
//! plain file name of safe characters, at most [`MAX_IMAGE_DEPTH`] of them.
//!
//! Downloads go to `<images>/.partial/`, are hashed while streaming and fsynced. The verified
//! digest is then written to `<images>/.meta/<name>.sha256`, and only then the file is renamed
//! into place (RENAME_NOREPLACE, then the directory is fsynced): the final name never holds
//! a partial or unverified file, and a published image always has its digest, whenever the
//! agent dies. A digest without its image (the agent died between the two) is removed at the
//! next start, with the partial downloads and temporary files ([`clean_store`]).
//!
//! The file work runs on tokio's blocking threads, not on the threads that answer the bus.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

use crate::fsutil::{self, FsError};

/// Refuse downloads larger than this (a typo'd URL pointing at a stream must not fill the disk).
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("invalid image URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid SHA-256 {0:?}: expected 64 hexadecimal digits")]
    BadDigest(String),
    #[error("image {name} already exists with a different SHA-256 ({existing})")]
    Conflict { name: String, existing: String },
    #[error("downloading {url}: {reason}")]
    Download { url: String, reason: String },
    #[error("{url}: SHA-256 mismatch: expected {expected}, got {actual}; nothing was stored")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url} is larger than the limit of {MAX_IMAGE_BYTES} bytes")]
    TooLarge { url: String },
    #[error("no image named {0:?} in the image store")]
    NotFound(String),
    #[error("the pull of {url} was canceled; nothing was stored")]
    Canceled { url: String },
    #[error(transparent)]
    Fs(#[from] FsError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub size: u64,
    /// Verified SHA-256 for pulled images; empty for files placed by other means.
    pub sha256: String,
}

/// A job's progress and its cancellation, shared with whoever watches it: bytes of an image
/// pull, actions of an ApplyVms.
#[derive(Debug, Default)]
pub struct JobControl {
    done: AtomicU64,
    /// 0 while unknown (no Content-Length yet, or none sent).
    total: AtomicU64,
    canceled: AtomicBool,
    cancel: tokio::sync::Notify,
    /// What the job does right now, for its `Status` (a migration's progress as JSON).
    status: std::sync::Mutex<String>,
}

impl JobControl {
    /// Bytes received and expected (0: not known).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Stops the download at its next chunk or while it waits for one; the partial file is
    /// removed and nothing is published.
    pub fn cancel(&self) {
        self.canceled.store(true, Ordering::SeqCst);
        self.cancel.notify_waiters();
    }

    /// Sets what is expected (an ApplyVms: its actions).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// One more step done (an ApplyVms' action).
    pub fn advance(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }

    /// Sets the amount done (a migration's bytes sent).
    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    pub fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_status(&self, status: String) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Resolves once [`JobControl::cancel`] was called.
    pub async fn canceled(&self) {
        loop {
            let notified = self.cancel.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_canceled() {
                return;
            }
            notified.await;
        }
    }
}

pub fn http_client() -> Result<reqwest::Client, ImageError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| ImageError::Download {
            url: String::new(),
            reason: e.to_string(),
        })
}

/// A name is acceptable in the store if it is a plain file name of safe characters.
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

/// Most path segments an image name may have.
pub const MAX_IMAGE_DEPTH: usize = 8;

/// An image name: one or more [`valid_image_name`] segments joined by `/`.
pub fn valid_image_path(name: &str) -> bool {
    let segments: Vec<&str> = name.split('/').collect();
    segments.len() <= MAX_IMAGE_DEPTH && segments.iter().all(|s| valid_image_name(s))
}

/// True if every directory on the way from the store to image `name` is a real directory,
/// not a symlink (which could lead out of the store). Blocking (a few stats).
pub fn inside_store(images: &Path, name: &str) -> bool {
    let mut dir = images.to_owned();
    let segments: Vec<&str> = name.split('/').collect();
    for segment in &segments[..segments.len().saturating_sub(1)] {
        dir.push(segment);
        match dir.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Name under which `url` is stored: its path without the leading `/`.
pub fn image_name_from_url(url: &reqwest::Url) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::BadUrl {
        url: url.to_string(),
        reason: reason.to_owned(),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad("only http and https are supported"));
    }
    let name = url.path().trim_start_matches('/');
    if !valid_image_path(name) {
        return Err(bad(&format!(
            "the path must be at most {MAX_IMAGE_DEPTH} segments, each a file name of letters, \
             digits, '.', '_', '-', '+' (not starting with '.' or '-')"
        )));
    }
    Ok(name.to_owned())
}

fn meta_file(images: &Path, name: &str) -> PathBuf {
    images.join(".meta").join(format!("{name}.sha256"))
}

fn partial_dir(images: &Path) -> PathBuf {
    images.join(".partial")
}

/// Removes what an earlier agent left unfinished: partial downloads, temporary files of
/// interrupted atomic writes, digests whose image was never published. Blocking.
pub fn clean_store(images: &Path) {
    let _ = std::fs::remove_dir_all(partial_dir(images));
    let meta = images.join(".meta");
    for file in walk(&meta) {
        let Ok(rel) = file.strip_prefix(&meta) else {
            continue;
        };
        let rel = rel.to_string_lossy();
        let orphan = match rel.strip_suffix(".sha256") {
            Some(name) => !images.join(name).is_file(),
            None => true,
        };
        if orphan {
            tracing::info!("removing leftover {}", file.display());
            let _ = std::fs::remove_file(&file);
        }
    }
    for file in walk(images) {
        let hidden_tmp = file
            .file_name()
            .map(|n| n.to_string_lossy())
            .is_some_and(|n| n.starts_with('.') && n.contains(".tmp."));
        if hidden_tmp {
            tracing::info!("removing leftover {}", file.display());
            let _ = std::fs::remove_file(&file);
        }
    }
}

/// Regular files below `dir`, recursively (symlinks are not followed).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ImageError::Download {
            url: String::new(),
            reason: format!("file task failed: {e}"),
        })?
}

/// SHA-256 of a file on disk.
pub async fn file_sha256(path: &Path) -> Result<String, ImageError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path).map_err(|e| FsError::io("open", &path, e))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(|e| FsError::io("read", &path, e))?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| ImageError::Download {
        url: String::new(),
        reason: format!("hashing task failed: {e}"),
    })?
}

/// Downloads `url` into the store, verifying `sha256`. Idempotent: if the image already exists
/// with that digest, its path is returned without downloading again. Callers serialize pulls
/// of the same name.
pub async fn pull(
    client: &reqwest::Client,
    images: &Path,
    url: &str,
    sha256: &str,
    control: &JobControl,
) -> Result<PathBuf, ImageError> {
    let expected = sha256.to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::BadDigest(sha256.to_owned()));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| ImageError::BadUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    let name = image_name_from_url(&parsed)?;
    let final_path = images.join(&name);
    let exists = {
        let p = final_path.clone();
        blocking(move || Ok(p.exists())).await?
    };
    if exists {
        return verify_existing(images, &name, &expected).await;
    }
    let partial = partial_dir(images);
    let tmp = {
        let (partial, name) = (partial.clone(), name.replace('/', "_"));
        blocking(move || {
            fsutil::create_dir_all(&partial, 0o700)?;
            Ok(fsutil::temp_sibling(&partial.join(name))?)
        })
        .await?
    };
    if let Err(e) = download_to(client, url, &parsed, &tmp, &expected, control).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let published = {
        let (images, name, tmp, expected) = (
            images.to_owned(),
            name.clone(),
            tmp.clone(),
            expected.clone(),
        );
        blocking(move || publish(&images, &name, &tmp, &expected)).await
    };
    match published {
        Ok(Published::New) => Ok(final_path),
        Ok(Published::Existed) => verify_existing(images, &name, &expected).await,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

enum Published {
    New,
    /// A file of that name appeared meanwhile (placed by hand): it was left alone.
    Existed,
}

/// The digest first, then the file under its name: a published image always has its
/// digest. Blocking.
fn publish(images: &Path, name: &str, tmp: &Path, expected: &str) -> Result<Published, ImageError> {
    let final_path = images.join(name);
    let parent = final_path.parent().unwrap_or(images).to_owned();
    fsutil::create_dir_all(&parent, 0o755)?;
    let meta = meta_file(images, name);
    fsutil::create_dir_all(meta.parent().unwrap_or(images), 0o755)?;
    fsutil::write_atomic(&meta, format!("{expected}\n").as_bytes(), 0o644)?;
    // Publish: never replace an existing file (a file placed by hand meanwhile wins).
    if let Err(e) = fsutil::rename_noreplace(tmp, &final_path) {
        let _ = std::fs::remove_file(tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            // That file's digest is not known to be ours.
            let _ = fsutil::remove_durable(&meta);
            return Ok(Published::Existed);
        }
        let _ = fsutil::remove_durable(&meta);
        return Err(FsError::io("rename into place", &final_path, e).into());
    }
    fsutil::fsync_dir(&parent)?;
    Ok(Published::New)
}

/// An image of the name exists: fine if it has the expected digest (a repeated pull).
async fn verify_existing(images: &Path, name: &str, expected: &str) -> Result<PathBuf, ImageError> {
    let final_path = images.join(name);
    let existing = file_sha256(&final_path).await?;
    if existing != expected {
        return Err(ImageError::Conflict {
            name: name.to_owned(),
            existing,
        });
    }
    // A pulled image keeps its digest record (restored if it went missing).
    let meta = meta_file(images, name);
    let record = format!("{expected}\n");
    blocking(move || {
        if std::fs::read_to_string(&meta).ok().as_deref() != Some(record.as_str()) {
            fsutil::create_dir_all(meta.parent().unwrap_or(Path::new("/")), 0o755)?;
            fsutil::write_atomic(&meta, record.as_bytes(), 0o644)?;
        }
        Ok(())
    })
    .await?;
    Ok(final_path)
}

async fn download_to(
    client: &reqwest::Client,
    url: &str,
    parsed: &reqwest::Url,
    tmp: &Path,
    expected: &str,
    control: &JobControl,
) -> Result<(), ImageError> {
    let dl_err = |reason: String| ImageError::Download {
        url: url.to_owned(),
        reason,
    };
    let canceled = || ImageError::Canceled {
        url: url.to_owned(),
    };
    let mut resp = tokio::select! {
        resp = client.get(parsed.clone()).send() => resp.map_err(|e| dl_err(error_chain(&e)))?,
        () = control.canceled() => return Err(canceled()),
    };
    if !resp.status().is_success() {
        return Err(dl_err(format!("server answered {}", resp.status())));
    }
    if resp.content_length().is_some_and(|l| l > MAX_IMAGE_BYTES) {
        return Err(ImageError::TooLarge {
            url: url.to_owned(),
        });
    }
    control
        .total
        .store(resp.content_length().unwrap_or(0), Ordering::Relaxed);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .await
        .map_err(|e| FsError::io("create", tmp, e))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let chunk = tokio::select! {
            chunk = resp.chunk() => chunk.map_err(|e| dl_err(error_chain(&e)))?,
            () = control.canceled() => return Err(canceled()),
        };
        let Some(chunk) = chunk else { break };
        total += chunk.len() as u64;
        control.done.store(total, Ordering::Relaxed);
        if total > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge {
                url: url.to_owned(),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| FsError::io("write", tmp, e))?;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(ImageError::Checksum {
            url: url.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    file.sync_all()
        .await
        .map_err(|e| FsError::io("fsync", tmp, e))?;
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Lists the regular files in the store (hidden bookkeeping directories excluded), named by
/// their path in the store. Blocking.
pub fn list(images: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    if let Err(e) = std::fs::metadata(images) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(Vec::new());
        }
        return Err(FsError::io("list", images, e).into());
    }
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(images.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') {
                continue;
            }
            let rel = rel.join(&file);
            // Directories are walked only when real (a symlinked one could loop or lead
            // out of the store); files may be symlinks, as before.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(rel);
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let name = rel.to_string_lossy().into_owned();
            let sha256 = std::fs::read_to_string(meta_file(images, &name))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            out.push(ImageInfo {
                name,
                size: meta.len(),
                sha256,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes image `name` and its digest durably, and directories it leaves empty. Blocking;
/// the caller checks that no VM uses it.
pub fn delete(images: &Path, name: &str) -> Result<(), ImageError> {
    let path = images.join(name);
    if !inside_store(images, name) {
        return Err(ImageError::NotFound(name.to_owned()));
    }
    match path.symlink_metadata() {
        Ok(m) if m.is_file() || m.file_type().is_symlink() => {}
        Ok(_) => return Err(ImageError::NotFound(name.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound(name.to_owned()))
        }
        Err(e) => return Err(FsError::io("inspect", &path, e).into()),
    }
    fsutil::remove_durable(&path)?;
    fsutil::remove_durable(&meta_file(images, name))?;
    for root in [images.to_owned(), images.join(".meta")] {
        let mut dir = root.join(name);
        while dir.pop() && dir != root && dir.starts_with(&root) {
            // Only empty directories go; the first non-empty one ends the walk.
            if std::fs::remove_dir(&dir).is_err() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_url_path() {
        let name = |u: &str| image_name_from_url(&reqwest::Url::parse(u).unwrap());
        assert_eq!(name("https://h/vmlinuz").unwrap(), "vmlinuz");
        assert_eq!(name("https://h/a/vmlinuz").unwrap(), "a/vmlinuz");
        assert_eq!(name("http://h:8080/x/y/z.img?q=1").unwrap(), "x/y/z.img");
        for bad in [
            "https://h/",
            "https://h/a//b",
            "https://h/a/",
            "https://h/.hidden/x",
            "https://h/a/..%2f..%2fx",
            "https://h/1/2/3/4/5/6/7/8/9",
            "ftp://h/x",
        ] {
            assert!(name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_symlinked_directory_is_not_inside_the_store() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("images");
        std::fs::create_dir_all(store.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", store.join("link")).unwrap();
        assert!(inside_store(&store, "real/x"));
        assert!(inside_store(&store, "x"));
        assert!(!inside_store(&store, "link/passwd"));
        assert!(!inside_store(&store, "missing/x"));
        assert!(matches!(
            delete(&store, "link/passwd"),
            Err(ImageError::NotFound(_))
        ));
        assert!(std::path::Path::new("/etc/passwd").exists());
        std::fs::write(store.join("real/x"), b"x").unwrap();
        let names: Vec<String> = list(&store).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["real/x"], "the symlinked directory is not walked");
    }
}
