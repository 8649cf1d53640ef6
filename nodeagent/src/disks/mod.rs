//! The disk store (`<state>/disks`): the writable raw disks VMs use. `CreateDisk` makes an
//! empty sparse disk or one from an image of the image store, `ResizeDisk` grows one,
//! `DeleteDisk` removes one, `ListDisks` lists them. Which VMs use a disk is the node's
//! business ([`crate::node`]); this module only handles files.
//!
//! Disks are raw, always: the VMM a guest attacks never parses an image format. A qcow2
//! image (what most clouds publish) is converted once, at import, by `qemu-img` in a
//! confined process ([`qemu_img`]), and refused if it refers to other files. A raw image is
//! reflinked when the file system can, else copied sparsely ([`copy`]). Space is checked
//! before anything is written (the data to copy against the free space, less a reserve),
//! and the disk is built in a hidden temporary file in the store, fsynced and renamed to its
//! name (never replacing a file) only when complete: a failure, a refused image or a killed
//! agent leaves nothing under the name (the next agent removes stale temporary files).

pub mod copy;
pub mod qemu_img;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil::{self, FsError};
use crate::images::{inside_store, valid_image_name, valid_image_path};
use qemu_img::{Format, QemuImgError};

/// Largest disk accepted (ext4's file size limit with 4 KiB blocks).
pub const MAX_DISK_BYTES: u64 = 16 << 40;
/// Free space left to the VMs' own disk writes after an import.
pub const RESERVE_MAX_BYTES: u64 = 256 << 20;
/// Disks are read and written in 512-byte sectors.
pub const SECTOR: u64 = 512;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error(
        "invalid disk name {0:?}: 1 to 128 letters, digits, '.', '_', '-', '+', not starting \
         with '.' or '-'"
    )]
    BadName(String),
    #[error("invalid disk options: {0}")]
    BadOptions(String),
    #[error("no disk named {0:?} in the disk store")]
    NotFound(String),
    #[error("no image named {0:?} in the image store")]
    ImageNotFound(String),
    #[error("a disk named {0:?} already exists")]
    Exists(String),
    #[error("image {image}: {reason}; nothing was stored")]
    InvalidImage { image: String, reason: String },
    #[error(
        "not enough space in the disk store for image {image}: {needed} bytes to write, \
         {free} free (of which {reserve} stay reserved for running VMs); nothing was stored"
    )]
    NoSpace {
        image: String,
        needed: u64,
        free: u64,
        reserve: u64,
    },
    #[error("disk {name}: {reason}")]
    Shrink { name: String, reason: String },
    #[error(transparent)]
    Tool(QemuImgError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// `CreateDisk`'s options (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    /// Bytes; required for an empty disk; with `from_image`, grow the copy to this size.
    #[serde(default)]
    pub size: Option<u64>,
    /// An image in the image store (raw or qcow2).
    #[serde(default)]
    pub from_image: Option<String>,
}

/// How a disk was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Empty,
    Reflink,
    SparseCopy,
    QemuImgConvert,
}

/// `CreateDisk`'s answer (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Created {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub allocated: u64,
    /// The image's format, if made from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_format: Option<&'static str>,
    pub method: Method,
}

/// One disk of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskInfo {
    pub name: String,
    /// Virtual size (the raw file's length).
    pub size: u64,
    /// Bytes it occupies on disk.
    pub allocated: u64,
}

/// The stores and the tool a disk operation works with.
#[derive(Debug, Clone)]
pub struct DiskStore {
    pub disks: PathBuf,
    pub images: PathBuf,
    pub qemu_img: PathBuf,
}

pub fn parse_options(json: &str) -> Result<CreateOptions, DiskError> {
    let o: CreateOptions =
        serde_json::from_str(json).map_err(|e| DiskError::BadOptions(e.to_string()))?;
    match (&o.from_image, o.size) {
        (None, None) => Err(DiskError::BadOptions(
            "give \"size\" (an empty disk) or \"from_image\" (a copy of an image)".to_owned(),
        )),
        (_, Some(size)) => check_size(size).map(|()| o),
        (Some(_), None) => Ok(o),
    }
}

fn check_size(size: u64) -> Result<(), DiskError> {
    if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_DISK_BYTES {
        return Err(DiskError::BadOptions(format!(
            "size {size} must be a positive multiple of {SECTOR} bytes, at most {MAX_DISK_BYTES}"
        )));
    }
    Ok(())
}

pub fn validate_name(name: &str) -> Result<(), DiskError> {
    if valid_image_name(name) {
        Ok(())
    } else {
        Err(DiskError::BadName(name.to_owned()))
    }
}

/// A temporary file in the store, removed unless [`Temp::publish`]ed (also when the
/// operation is dropped half-way).
struct Temp {
    path: PathBuf,
    file: File,
    keep: bool,
}

impl Temp {
    /// Creates it empty: mode 0660 whatever the umask (the VMM's group writes disks).
    fn create(target: &Path) -> Result<Temp, DiskError> {
        let path = fsutil::temp_sibling(target)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o660)
            .open(&path)
            .map_err(|e| FsError::io("create", &path, e))?;
        let t = Temp {
            path,
            file,
            keep: false,
        };
        t.file
            .set_permissions(std::fs::Permissions::from_mode(0o660))
            .map_err(|e| FsError::io("chmod", &t.path, e))?;
        Ok(t)
    }

    /// fsync, rename to `target` (never over an existing file), fsync the directory.
    fn publish(mut self, target: &Path, name: &str) -> Result<(), DiskError> {
        self.file
            .sync_all()
            .map_err(|e| FsError::io("fsync", &self.path, e))?;
        match fsutil::rename_noreplace(&self.path, target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DiskError::Exists(name.to_owned()))
            }
            Err(e) => return Err(FsError::io("rename into place", target, e).into()),
        }
        self.keep = true;
        fsutil::fsync_dir(target.parent().unwrap_or(Path::new("/")))?;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DiskError> + Send + 'static,
) -> Result<T, DiskError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        DiskError::Fs(FsError::io(
            "disk operation",
            Path::new(""),
            std::io::Error::other(e.to_string()),
        ))
    })?
}

/// Makes disk `name` as `opts` say. Callers serialize operations on one name.
pub async fn create(
    store: &DiskStore,
    name: &str,
    opts: &CreateOptions,
) -> Result<Created, DiskError> {
    validate_name(name)?;
    let target = store.disks.join(name);
    if target.symlink_metadata().is_ok() {
        return Err(DiskError::Exists(name.to_owned()));
    }
    let created = match &opts.from_image {
        None => {
            let size = opts
                .size
                .ok_or_else(|| DiskError::BadOptions("an empty disk needs a size".to_owned()))?;
            check_size(size)?;
            let (target, name) = (target.clone(), name.to_owned());
            blocking(move || {
                let temp = Temp::create(&target)?;
                temp.file
                    .set_len(size)
                    .map_err(|e| FsError::io("size", &temp.path, e))?;
                temp.publish(&target, &name)
            })
            .await?;
            (None, Method::Empty)
        }
        Some(image) => {
            let (format, method) = from_image(store, name, &target, image, opts.size).await?;
            (Some(format.as_str()), method)
        }
    };
    let meta = std::fs::metadata(&target).map_err(|e| FsError::io("stat", &target, e))?;
    Ok(Created {
        name: name.to_owned(),
        path: target,
        size: meta.len(),
        allocated: copy::allocated(&meta),
        source_format: created.0,
        method: created.1,
    })
}

async fn from_image(
    store: &DiskStore,
    name: &str,
    target: &Path,
    image: &str,
    size: Option<u64>,
) -> Result<(Format, Method), DiskError> {
    if !valid_image_path(image) || !inside_store(&store.images, image) {
        return Err(DiskError::ImageNotFound(image.to_owned()));
    }
    let source = store.images.join(image);
    // Not a symlink (it could lead out of the store): the image store's own files only.
    match source.symlink_metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(DiskError::InvalidImage {
                image: image.to_owned(),
                reason: "not a regular file".to_owned(),
            })
        }
        Err(_) => return Err(DiskError::ImageNotFound(image.to_owned())),
    }
    let refused = |reason: String| DiskError::InvalidImage {
        image: image.to_owned(),
        reason,
    };
    let tool = |e: QemuImgError| match e {
        QemuImgError::Spawn { .. } => DiskError::Tool(e),
        other => refused(other.to_string()),
    };
    let probed = qemu_img::probe(&store.qemu_img, &source)
        .await
        .map_err(tool)?
        .map_err(|r| refused(r.0))?;
    let final_size = match size {
        Some(s) if s < probed.virtual_size => {
            return Err(DiskError::BadOptions(format!(
                "size {s} is smaller than image {image}'s virtual size {}; disks are never \
                 shrunk (it destroys data)",
                probed.virtual_size
            )))
        }
        Some(s) => s,
        None => probed.virtual_size,
    };
    if probed.virtual_size > MAX_DISK_BYTES {
        return Err(refused(format!(
            "its virtual size {} is beyond the limit of {MAX_DISK_BYTES} bytes",
            probed.virtual_size
        )));
    }
    let needed = match probed.format {
        Format::Raw => None, // known once a reflink failed
        Format::Qcow2 => Some(
            qemu_img::measure_qcow2(&store.qemu_img, &source)
                .await
                .map_err(tool)?,
        ),
    };
    let temp = {
        let target = target.to_owned();
        blocking(move || Temp::create(&target)).await?
    };
    let method = match probed.format {
        Format::Raw => {
            let (store_dir, image) = (store.disks.clone(), image.to_owned());
            let (source, len) = (source.clone(), probed.virtual_size);
            let (method, temp) = blocking(move || {
                let src = File::open(&source).map_err(|e| FsError::io("open", &source, e))?;
                match copy::reflink(&src, &temp.file) {
                    Ok(()) => return Ok((Method::Reflink, temp)),
                    Err(e) if copy::is_unsupported(&e) => {}
                    Err(e) => return Err(FsError::io("reflink", &temp.path, e).into()),
                }
                let meta = src
                    .metadata()
                    .map_err(|e| FsError::io("stat", &source, e))?;
                check_space(&store_dir, &image, copy::allocated(&meta).min(len))?;
                copy::sparse_copy(&src, &temp.file, len)
                    .map_err(|e| FsError::io("copy", &temp.path, e))?;
                Ok((Method::SparseCopy, temp))
            })
            .await?;
            return finish(temp, target, name, final_size, probed.format, method).await;
        }
        Format::Qcow2 => {
            let needed = needed.unwrap_or(probed.virtual_size);
            {
                let (dir, image) = (store.disks.clone(), image.to_owned());
                blocking(move || check_space(&dir, &image, needed)).await?;
            }
            temp.file
                .set_len(probed.virtual_size)
                .map_err(|e| FsError::io("size", &temp.path, e))?;
            qemu_img::convert_qcow2_to_raw(
                &store.qemu_img,
                &source,
                &temp.path,
                probed.virtual_size,
            )
            .await
            .map_err(tool)?;
            Method::QemuImgConvert
        }
    };
    finish(temp, target, name, final_size, probed.format, method).await
}

/// Grows the finished copy to `size` and publishes it.
async fn finish(
    temp: Temp,
    target: &Path,
    name: &str,
    size: u64,
    format: Format,
    method: Method,
) -> Result<(Format, Method), DiskError> {
    let (target, name) = (target.to_owned(), name.to_owned());
    blocking(move || {
        let len = temp
            .file
            .metadata()
            .map_err(|e| FsError::io("stat", &temp.path, e))?
            .len();
        if size > len {
            temp.file
                .set_len(size)
                .map_err(|e| FsError::io("grow", &temp.path, e))?;
        }
        temp.publish(&target, &name)
    })
    .await?;
    Ok((format, method))
}

/// Free bytes for unprivileged writers in the file system of `dir`, and its size.
pub fn fs_space(dir: &Path) -> Result<(u64, u64), DiskError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| FsError::io("statvfs", dir, std::io::Error::other(e)))?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(FsError::io("statvfs", dir, std::io::Error::last_os_error()).into());
    }
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// Refuses an import of `needed` bytes unless they fit with a reserve (5 % of the file
/// system, at most [`RESERVE_MAX_BYTES`]) left for the running VMs.
fn check_space(dir: &Path, image: &str, needed: u64) -> Result<(), DiskError> {
    let (free, total) = fs_space(dir)?;
    let reserve = (total / 20).min(RESERVE_MAX_BYTES);
    if needed.saturating_add(reserve) > free {
        return Err(DiskError::NoSpace {
            image: image.to_owned(),
            needed,
            free,
            reserve,
        });
    }
    Ok(())
}

/// Path of disk `name`, which must be a regular file of the store (not a symlink).
fn existing(store: &DiskStore, name: &str) -> Result<PathBuf, DiskError> {
    validate_name(name)?;
    let path = store.disks.join(name);
    match path.symlink_metadata() {
        Ok(m) if m.is_file() => Ok(path),
        _ => Err(DiskError::NotFound(name.to_owned())),
    }
}

/// The path of disk `name` if it exists.
pub fn path_of(store: &DiskStore, name: &str) -> Result<PathBuf, DiskError> {
    existing(store, name)
}

/// Grows disk `name` to `size` bytes (the new range reads as zeros and takes no space).
/// Shrinking is refused: it cuts off the guest's data.
pub async fn resize(store: &DiskStore, name: &str, size: u64) -> Result<(), DiskError> {
    let path = existing(store, name)?;
    check_size(size).map_err(|e| match e {
        DiskError::BadOptions(m) => DiskError::Shrink {
            name: name.to_owned(),
            reason: m,
        },
        other => other,
    })?;
    let name = name.to_owned();
    blocking(move || {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| FsError::io("open", &path, e))?;
        let len = f
            .metadata()
            .map_err(|e| FsError::io("stat", &path, e))?
            .len();
        if size < len {
            return Err(DiskError::Shrink {
                name,
                reason: format!(
                    "it is {len} bytes; shrinking to {size} would destroy the data beyond, \
                     so disks only grow"
                ),
            });
        }
        if size > len {
            f.set_len(size).map_err(|e| FsError::io("grow", &path, e))?;
            f.sync_all().map_err(|e| FsError::io("fsync", &path, e))?;
        }
        Ok(())
    })
    .await
}

/// Removes disk `name` (durably).
pub async fn delete(store: &DiskStore, name: &str) -> Result<(), DiskError> {
    let path = existing(store, name)?;
    blocking(move || fsutil::remove_durable(&path).map_err(DiskError::from)).await
}

/// The disks in the store, by name (hidden temporary files excluded).
pub async fn list(store: &DiskStore) -> Result<Vec<DiskInfo>, DiskError> {
    let dir = store.disks.clone();
    blocking(move || {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| FsError::io("list", &dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // Regular files only: a symlink is no disk of the store (Resize and Delete
            // refuse them too).
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            out.push(DiskInfo {
                name,
                size: meta.len(),
                allocated: copy::allocated(&meta),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(
            parse_options(r#"{"size": 1048576}"#).unwrap(),
            CreateOptions {
                size: Some(1 << 20),
                from_image: None
            }
        );
        assert_eq!(
            parse_options(r#"{"from_image": "debian.qcow2"}"#)
                .unwrap()
                .from_image
                .as_deref(),
            Some("debian.qcow2")
        );
        for bad in [
            "{}",
            r#"{"size": 0}"#,
            r#"{"size": 1000}"#,
            r#"{"size": -512}"#,
            r#"{"size": 1048576, "sise": 1}"#,
            r#"{"from_image": "x", "size": 17592186044928}"#,
            "not json",
        ] {
            assert!(
                matches!(parse_options(bad), Err(DiskError::BadOptions(_))),
                "{bad}"
            );
        }
        assert!(validate_name("web-root.img").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn space_check_keeps_a_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = fs_space(dir.path()).unwrap();
        assert!(free > 0 && total >= free);
        let reserve = (total / 20).min(RESERVE_MAX_BYTES);
        assert!(check_space(dir.path(), "i", 0).is_ok() || free < reserve);
        let e = check_space(dir.path(), "big.img", free).unwrap_err();
        assert!(matches!(e, DiskError::NoSpace { .. }), "{e}");
        assert!(e.to_string().contains("nothing was stored"), "{e}");
    }
}
