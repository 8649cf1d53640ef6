//! Host operations the agent does not do itself: checking for and installing an image
//! update (systemd-sysupdate writes partitions and the ESP, which the agent's sandbox
//! forbids) and rebooting. The node asks a [`HostControl`]; which one serves is the
//! daemon's choice (`--host-helper`), so the domain logic never knows how.
//!
//! [`HelperHost`] runs a helper program with the operation as arguments:
//! `HELPER check [URL]`, `HELPER install [URL]` (stdout: the version found or installed,
//! nothing when none is newer; exit 0), `HELPER reboot`. On failure its stderr is the
//! error the caller sees. [`NoHost`] refuses every operation with a clear reason.

use std::path::PathBuf;
use std::process::Stdio;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("{0}")]
    NotConfigured(String),
    #[error("running {helper}: {source}")]
    Spawn {
        helper: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

/// What an update call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateAction {
    /// Only look: the newest version the server offers beyond what is installed.
    Check,
    /// Download, verify and install it into the inactive slot (booted at the next reboot).
    Install,
}

impl UpdateAction {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateAction::Check => "check",
            UpdateAction::Install => "install",
        }
    }
}

pub trait HostControl: Send + Sync {
    /// Whether this node can update and reboot at all: checked before anything is done
    /// (a Reboot must not shut the VMs down for a reboot that cannot happen).
    fn available(&self) -> Result<(), HostError> {
        Ok(())
    }
    /// Checks for or installs an update from `url` ("": the node's configured server).
    /// `Some(version)`: found or installed; `None`: nothing newer.
    fn update<'a>(
        &'a self,
        action: UpdateAction,
        url: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, HostError>>;
    /// Starts the host's reboot.
    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>>;
}

/// No host operations on this node (no `--host-helper`).
pub struct NoHost;

impl NoHost {
    fn refuse() -> HostError {
        HostError::NotConfigured(
            "this agent has no host control (it runs without --host-helper)".to_owned(),
        )
    }
}

impl HostControl for NoHost {
    fn available(&self) -> Result<(), HostError> {
        Err(Self::refuse())
    }

    fn update<'a>(
        &'a self,
        _: UpdateAction,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, HostError>> {
        async { Err(Self::refuse()) }.boxed()
    }

    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>> {
        async { Err(Self::refuse()) }.boxed()
    }
}

/// Runs `--host-helper` (see the module docs).
pub struct HelperHost {
    helper: PathBuf,
}

impl HelperHost {
    pub fn new(helper: PathBuf) -> Self {
        HelperHost { helper }
    }

    async fn run(&self, args: &[&str]) -> Result<String, HostError> {
        let helper = self.helper.display().to_string();
        let out = tokio::process::Command::new(&self.helper)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| HostError::Spawn {
                helper: helper.clone(),
                source,
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            return Err(HostError::Failed(if err.is_empty() {
                format!("{helper} {}: {}", args.join(" "), out.status)
            } else {
                // The last lines say what went wrong; a chatty helper is cut.
                let tail: Vec<&str> = err.lines().rev().take(8).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            }));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A version as the helper printed it: one line of version characters (UAPI versions).
fn parse_version(out: &str) -> Result<Option<String>, HostError> {
    if out.is_empty() {
        return Ok(None);
    }
    let ok = out.len() <= 64
        && out
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-^".contains(c));
    if ok {
        Ok(Some(out.to_owned()))
    } else {
        Err(HostError::Failed(format!(
            "the host helper printed no version: {:?}",
            out.chars().take(200).collect::<String>()
        )))
    }
}

impl HostControl for HelperHost {
    fn update<'a>(
        &'a self,
        action: UpdateAction,
        url: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, HostError>> {
        async move {
            let mut args = vec![action.as_str()];
            if !url.is_empty() {
                args.push(url);
            }
            parse_version(&self.run(&args).await?)
        }
        .boxed()
    }

    fn reboot(&self) -> BoxFuture<'_, Result<(), HostError>> {
        async move { self.run(&["reboot"]).await.map(|_| ()) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_output_is_a_version_or_nothing() {
        assert_eq!(parse_version("").unwrap(), None);
        assert_eq!(
            parse_version("20261205.120000").unwrap().as_deref(),
            Some("20261205.120000")
        );
        assert!(parse_version("Selected update 1.2").is_err());
        assert!(parse_version("1.2\n1.3").is_err());
    }
}
