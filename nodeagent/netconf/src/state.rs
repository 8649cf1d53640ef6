//! The ownership file: which kernel links this configurator created (and may therefore change
//! destructively or delete), and which TAPs the VM lifecycle asked for.
//!
//! A link is ours when its name is recorded with the same ifindex. A record without an
//! ifindex is an intent written before creation: a crash between "create" and "record" then
//! still lets the next run claim the link instead of treating it as foreign forever.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::document::LinkKind;
use crate::model::ObservedLink;

const STATE_FILE: &str = "ownership.json";
const LOCK_FILE: &str = "lock";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); refusing to guess which links are ours: fix or remove it by hand")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, this build understands {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ownership {
    pub version: u32,
    #[serde(default)]
    pub links: BTreeMap<String, OwnedLink>,
    #[serde(default)]
    pub taps: BTreeMap<String, OwnedTap>,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            version: FORMAT_VERSION,
            links: BTreeMap::new(),
            taps: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedLink {
    pub kind: LinkKind,
    /// `None` while creation is in flight.
    pub ifindex: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedTap {
    pub uid: u32,
    pub gid: u32,
    pub bridge: Option<String>,
    pub vlan: Option<u16>,
    pub mtu: Option<u32>,
    pub ifindex: Option<u32>,
}

impl Ownership {
    /// Whether the kernel link `link` is one this configurator created.
    pub fn owns(&self, link: &ObservedLink) -> bool {
        match self.links.get(&link.name) {
            Some(OwnedLink {
                ifindex: Some(index),
                ..
            }) => *index == link.index,
            Some(OwnedLink {
                ifindex: None,
                kind,
            }) => link.kind.link_kind() == Some(*kind),
            None => false,
        }
    }

    /// Whether `link` is a TAP created through `create_tap`.
    pub fn owns_tap(&self, link: &ObservedLink) -> bool {
        match self.taps.get(&link.name) {
            Some(OwnedTap {
                ifindex: Some(index),
                ..
            }) => *index == link.index,
            Some(OwnedTap { ifindex: None, .. }) => {
                matches!(link.kind, crate::model::ObservedKind::Tun { .. })
            }
            None => false,
        }
    }
}

/// Where the ownership file lives; all access goes through an exclusive lock.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

/// Held while reading-modifying-writing the ownership file (across processes too: the CLI and
/// the daemon may run at once).
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateStore {
    pub fn new(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Blocks until no other process configures the network through this state dir.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, source)| StateError::Lock { path, source })?;
        Ok(StateLock { _lock: lock })
    }

    pub fn load(&self) -> Result<Ownership, StateError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ownership::default()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let ownership: Ownership =
            serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if ownership.version != FORMAT_VERSION {
            return Err(StateError::Version {
                path,
                found: ownership.version,
            });
        }
        Ok(ownership)
    }

    /// Atomic replace: temp file, fsync, rename, fsync the directory. A crash leaves either
    /// the old or the new file, never a torn one.
    pub fn save(&self, ownership: &Ownership) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let write_err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(ownership)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        {
            let mut file = File::create(&tmp).map_err(write_err)?;
            file.write_all(text.as_bytes()).map_err(write_err)?;
            file.write_all(b"\n").map_err(write_err)?;
            file.sync_all().map_err(write_err)?;
        }
        std::fs::rename(&tmp, &path).map_err(write_err)?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObservedBridge, ObservedKind};

    #[test]
    fn save_load_round_trip_and_ownership_rules() {
        let dir = std::env::temp_dir().join(format!("netconf-state-{}", std::process::id()));
        let store = StateStore::new(&dir).unwrap();
        assert_eq!(store.load().unwrap(), Ownership::default());
        let mut ownership = Ownership::default();
        ownership.links.insert(
            "br0".into(),
            OwnedLink {
                kind: LinkKind::Bridge,
                ifindex: Some(7),
            },
        );
        ownership.links.insert(
            "br1".into(),
            OwnedLink {
                kind: LinkKind::Bridge,
                ifindex: None,
            },
        );
        {
            let _lock = store.lock().unwrap();
            store.save(&ownership).unwrap();
        }
        assert_eq!(store.load().unwrap(), ownership);

        let bridge = ObservedKind::Bridge(ObservedBridge::default());
        assert!(ownership.owns(&ObservedLink::new(7, "br0", bridge.clone())));
        // Same name, other ifindex: someone re-created it; not ours.
        assert!(!ownership.owns(&ObservedLink::new(8, "br0", bridge.clone())));
        // Pending intent is claimed by kind.
        assert!(ownership.owns(&ObservedLink::new(9, "br1", bridge)));
        assert!(!ownership.owns(&ObservedLink::new(
            9,
            "br1",
            ObservedKind::Other { kind: None }
        )));

        std::fs::write(store.path(), "{ not json").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
