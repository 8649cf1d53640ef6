//! Host updates and reboots as jobs. `Update` asks the host control (see [`crate::host`])
//! to check for or install a new image version: a download of minutes runs as a job, so
//! no bus call waits for it; one update at a time. `Reboot` refuses new starts, shuts every
//! VM down gracefully (stopped after the timeout) and then has the host reboot; VMs with
//! autostart start again when the agent comes up on the next boot.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::audit::Origin;
use crate::host::{HostError, UpdateAction};
use crate::node::jobs::{Job, JobOperation};

fn host_err(e: HostError) -> NodeError {
    match e {
        HostError::NotConfigured(m) => NodeError::InvalidState(m),
        e => NodeError::Update(e.to_string()),
    }
}

/// An update server URL as a caller may give it: "" (the node's configured server), or an
/// http, https or file URL without spaces or control characters.
fn check_update_url(url: &str) -> Result<(), NodeError> {
    if url.is_empty() {
        return Ok(());
    }
    let scheme_ok = ["http://", "https://", "file:///"]
        .iter()
        .any(|s| url.starts_with(s));
    let chars_ok = url
        .chars()
        .all(|c| c.is_ascii_graphic() && !"\\|&\"'<>`".contains(c));
    if scheme_ok && chars_ok && url.len() <= 1024 {
        Ok(())
    } else {
        Err(NodeError::InvalidArgument(format!(
            "not an update server URL (http://, https:// or file:///, no spaces, quotes, \
             backslashes, | or &, at most 1024 bytes): {:?}",
            url.chars().take(200).collect::<String>()
        )))
    }
}

impl Node {
    /// True from a Reboot's start: no VM starts any more in this boot.
    pub fn is_rebooting(&self) -> bool {
        self.rebooting.load(Ordering::SeqCst)
    }

    /// Checks for or installs an update as a job; its message says which version was
    /// found or installed, or that none is newer.
    pub async fn start_update_job(
        self: &Arc<Self>,
        url: &str,
        action: UpdateAction,
        origin: Origin,
    ) -> Result<Arc<Job>, NodeError> {
        check_update_url(url)?;
        self.host.available().map_err(host_err)?;
        let guard = self.updating.clone().try_lock_owned().map_err(|_| {
            NodeError::Busy("an update is already in progress on this node".to_owned())
        })?;
        let job = self.new_job(JobOperation::Update, "", url, None, origin);
        let url = url.to_owned();
        self.run_job(job, move |node, _job| async move {
            let _guard = guard;
            let found = node.host.update(action, &url).await.map_err(host_err)?;
            let source = if url.is_empty() {
                "the configured update server".to_owned()
            } else {
                url.clone()
            };
            let message = match (action, found) {
                (_, None) => format!("no newer version than the installed ones at {source}"),
                (UpdateAction::Check, Some(v)) => format!("{v} is available at {source}"),
                (UpdateAction::Install, Some(v)) => {
                    format!("installed {v} from {source}; it boots at the next reboot")
                }
            };
            tracing::info!("update: {message}");
            Ok(message)
        })
        .await
    }

    /// Reboots the host as a job: refuses starts from now on, shuts the VMs down (stopped
    /// after `timeout_seconds`), then starts the host's reboot. If not every VM went down
    /// or the reboot cannot start, the job fails and starts are allowed again.
    pub async fn start_reboot_job(
        self: &Arc<Self>,
        timeout_seconds: u64,
        origin: Origin,
    ) -> Result<Arc<Job>, NodeError> {
        if !(1..=86_400).contains(&timeout_seconds) {
            return Err(NodeError::InvalidArgument(format!(
                "the reboot timeout must be 1 to 86400 seconds, not {timeout_seconds}"
            )));
        }
        self.host.available().map_err(host_err)?;
        if self.rebooting.swap(true, Ordering::SeqCst) {
            return Err(NodeError::Busy("the node is already rebooting".to_owned()));
        }
        let job = self.new_job(JobOperation::Reboot, "", "", None, origin);
        let result = self
            .run_job(job, move |node, _job| async move {
                let outcome = async {
                    node.shut_down_all(
                        Duration::from_secs(timeout_seconds),
                        "the reboot was not started",
                    )
                    .await?;
                    node.host.reboot().await.map_err(host_err)
                }
                .await;
                match outcome {
                    Ok(()) => {
                        tracing::info!("every VM is down; the host reboots");
                        Ok("every VM is down; the host reboots".to_owned())
                    }
                    Err(e) => {
                        node.rebooting.store(false, Ordering::SeqCst);
                        Err(e)
                    }
                }
            })
            .await;
        if result.is_err() {
            self.rebooting.store(false, Ordering::SeqCst);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_urls_are_checked() {
        for ok in [
            "",
            "http://10.0.2.2:8080/update",
            "https://u.example/x?y=1",
            "file:///srv/u",
        ] {
            assert!(check_update_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://x",
            "http://a b",
            "http://x/|y",
            "/srv/update",
            "http://x\n",
        ] {
            assert!(check_update_url(bad).is_err(), "{bad}");
        }
    }
}
