//! The NoCloud seed volume: a small FAT file system labelled `cidata` holding the documents
//! of [`crate::cloudinit::SeedFiles`], attached to the VM as its last disk, read-only.
//! cloud-init's NoCloud data source finds it by label (`LABEL`, or `LABEL_FATBOOT`, the
//! boot-sector label that the `fatfs` crate writes).
//!
//! Written in Rust with `fatfs`: the host image carries no mkfs tools. The image is built
//! in a temporary file next to its target and renamed over it when complete, so a VMM never
//! opens a half-written seed and a VMM still running on the previous seed keeps its file.
//! Timestamps are fixed (fatfs without its clock), so the same documents give the same
//! bytes.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cloudinit::{SeedFiles, MAX_SEED_BYTES};
use crate::fsutil::{self, FsError};

/// Size of the seed volume: FAT12 with room for [`MAX_SEED_BYTES`] and its overhead.
pub const SEED_IMAGE_BYTES: u64 = 1 << 20;
/// The label NoCloud looks for, space-padded to FAT's 11 bytes.
pub const VOLUME_LABEL: [u8; 11] = *b"cidata     ";

const _: () = assert!(MAX_SEED_BYTES as u64 * 2 < SEED_IMAGE_BYTES);

#[derive(Debug, Error)]
pub enum SeedError {
    #[error("building the cloud-init seed {path}: {source}")]
    Build {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Writes the seed volume for `files` to `target` (replacing it atomically). `volume_id`
/// becomes the FAT serial number (blkid's UUID of the volume).
pub fn write(target: &Path, files: &SeedFiles, volume_id: u32) -> Result<(), SeedError> {
    let tmp = fsutil::temp_sibling(target)?;
    let result = build(&tmp, files, volume_id).and_then(|()| {
        std::fs::rename(&tmp, target)
            .map_err(|e| FsError::io("rename into place", target, e).into())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn build(path: &Path, files: &SeedFiles, volume_id: u32) -> Result<(), SeedError> {
    let err = |source| SeedError::Build {
        path: path.to_owned(),
        source,
    };
    // The seed can carry secrets (user-data): no access for others.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| FsError::io("create", path, e))?;
    file.set_len(SEED_IMAGE_BYTES).map_err(err)?;
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new()
            .volume_label(VOLUME_LABEL)
            .volume_id(volume_id),
    )
    .map_err(err)?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(err)?;
        for (name, content) in files.files() {
            let mut f = fs.root_dir().create_file(name).map_err(err)?;
            f.truncate().map_err(err)?;
            f.write_all(content.as_bytes()).map_err(err)?;
            f.flush().map_err(err)?;
        }
        fs.unmount().map_err(err)?;
    }
    file.sync_all().map_err(|e| FsError::io("fsync", path, e))?;
    Ok(())
}

/// A FAT serial number derived from the VM's UUID (its first 32 bits), so seeds of
/// different VMs differ and the same VM's stays the same.
pub fn volume_id(uuid: &str) -> u32 {
    uuid.get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn files(user_data: &str, network: Option<&str>) -> SeedFiles {
        SeedFiles {
            meta_data: "{\"instance-id\": \"x\"}\n".to_owned(),
            user_data: user_data.to_owned(),
            network_config: network.map(str::to_owned),
        }
    }

    /// The volume's label and its root directory's files, read back with fatfs.
    fn read_back(path: &Path) -> (String, u32, Vec<(String, Vec<u8>)>) {
        let data = std::fs::read(path).unwrap();
        assert_eq!(data.len() as u64, SEED_IMAGE_BYTES);
        let fs = fatfs::FileSystem::new(Cursor::new(data), fatfs::FsOptions::new()).unwrap();
        let mut out = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.unwrap();
            let mut content = Vec::new();
            entry.to_file().read_to_end(&mut content).unwrap();
            out.push((entry.file_name(), content));
        }
        out.sort();
        (fs.volume_label(), fs.volume_id(), out)
    }

    #[test]
    fn seed_has_the_label_and_the_documents() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("seed.img");
        let user_data = format!("#cloud-config\n{}\n", "x".repeat(40_000));
        let seed = files(&user_data, Some("{\"version\": 2}\n"));
        write(&target, &seed, volume_id("0f3c1b2a-9d4e")).unwrap();
        let (label, id, found) = read_back(&target);
        assert_eq!(label, "cidata");
        assert_eq!(id, 0x0f3c_1b2a);
        assert_eq!(
            found,
            vec![
                ("meta-data".to_owned(), seed.meta_data.clone().into_bytes()),
                ("network-config".to_owned(), b"{\"version\": 2}\n".to_vec()),
                ("user-data".to_owned(), user_data.into_bytes()),
            ]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o007, 0, "no access for others: {mode:o}");

        // Rewritten from new documents: the old ones are gone, nothing else is left.
        write(&target, &files("#!/bin/sh\n", None), 7).unwrap();
        let (_, id, found) = read_back(&target);
        assert_eq!(id, 7);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data"]);
        assert_eq!(found[1].1, b"#!/bin/sh\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary files left");
    }

    #[test]
    fn same_documents_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let seed = files("#cloud-config\n{}\n", Some("{}\n"));
        write(&a, &seed, 1).unwrap();
        write(&b, &seed, 1).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    #[test]
    fn failure_leaves_the_previous_seed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("seed.img");
        write(&target, &files("one", None), 1).unwrap();
        let before = std::fs::read(&target).unwrap();
        // A target whose directory is gone cannot be written: nothing changes elsewhere.
        let missing = dir.path().join("gone/seed.img");
        assert!(write(&missing, &files("two", None), 1).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), before);
    }
}
