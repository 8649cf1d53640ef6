//! The image store: `PullImage` downloads over HTTP(S), verifies SHA-256 and publishes the
//! file under its final name only once complete and durable; `ListImages` lists it.
//!
//! Downloads go to `<images>/.partial/`, are hashed while streaming, fsynced, and renamed into
//! place (RENAME_NOREPLACE, then the directory is fsynced), so the final name never holds a
//! partial or unverified file, even if the agent dies mid-download. The verified digest is
//! kept in `<images>/.meta/<name>.sha256` for `ListImages`.

use std::path::{Path, PathBuf};
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

/// Name under which `url` is stored: its last path segment.
pub fn image_name_from_url(url: &reqwest::Url) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::BadUrl {
        url: url.to_string(),
        reason: reason.to_owned(),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad("only http and https are supported"));
    }
    let name = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    if !valid_image_name(name) {
        return Err(bad(
            "the last path segment must be a file name of letters, digits, '.', '_', '-', '+'",
        ));
    }
    Ok(name.to_owned())
}

fn meta_file(images: &Path, name: &str) -> PathBuf {
    images.join(".meta").join(format!("{name}.sha256"))
}

fn partial_dir(images: &Path) -> PathBuf {
    images.join(".partial")
}

/// Removes downloads that an earlier agent left unfinished.
pub fn clean_partials(images: &Path) {
    let _ = std::fs::remove_dir_all(partial_dir(images));
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
    if final_path.exists() {
        let existing = file_sha256(&final_path).await?;
        if existing == expected {
            return Ok(final_path);
        }
        return Err(ImageError::Conflict { name, existing });
    }
    let partial = partial_dir(images);
    fsutil::create_dir_all(&partial, 0o700)?;
    let tmp = fsutil::temp_sibling(&partial.join(&name))?;
    let result = download_to(client, url, &parsed, &tmp, &expected).await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Publish: never replace an existing file (a file placed by hand meanwhile wins).
    if let Err(e) = fsutil::rename_noreplace(&tmp, &final_path) {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let existing = file_sha256(&final_path).await?;
            if existing == expected {
                return Ok(final_path);
            }
            return Err(ImageError::Conflict { name, existing });
        }
        return Err(FsError::io("rename into place", &final_path, e).into());
    }
    fsutil::fsync_dir(images)?;
    let meta = meta_file(images, &name);
    fsutil::create_dir_all(meta.parent().unwrap_or(images), 0o755)?;
    fsutil::write_atomic(&meta, format!("{expected}\n").as_bytes(), 0o644)?;
    Ok(final_path)
}

async fn download_to(
    client: &reqwest::Client,
    url: &str,
    parsed: &reqwest::Url,
    tmp: &Path,
    expected: &str,
) -> Result<(), ImageError> {
    let dl_err = |reason: String| ImageError::Download {
        url: url.to_owned(),
        reason,
    };
    let mut resp = client
        .get(parsed.clone())
        .send()
        .await
        .map_err(|e| dl_err(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(dl_err(format!("server answered {}", resp.status())));
    }
    if resp.content_length().is_some_and(|l| l > MAX_IMAGE_BYTES) {
        return Err(ImageError::TooLarge {
            url: url.to_owned(),
        });
    }
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .await
        .map_err(|e| FsError::io("create", tmp, e))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| dl_err(error_chain(&e)))? {
        total += chunk.len() as u64;
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

/// Lists the regular files in the store (hidden bookkeeping directories excluded).
pub fn list(images: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(images) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(FsError::io("list", images, e).into()),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let sha256 = std::fs::read_to_string(meta_file(images, &name))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        out.push(ImageInfo {
            name,
            size: meta.len(),
            sha256,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
