//! The host network on the node: ApplyNetwork, the network credential, NetworkState.

use super::*;

impl Node {
    // ----- network -------------------------------------------------------------------------

    pub async fn apply_network(
        &self,
        document_json: &str,
        dry_run: bool,
    ) -> Result<String, NodeError> {
        Network::validate(document_json)?;
        if dry_run {
            return Ok(self.network.plan(document_json).await?);
        }
        let _g = self.net_lock.lock().await;
        match self.network.apply(document_json).await {
            Ok(plan) => {
                let (file, data) = (self.cfg.layout.network_file(), document_json.to_owned());
                blocking(move || fsutil::write_atomic(&file, data.as_bytes(), 0o640))
                    .await?
                    .map_err(io)?;
                self.set_network_state("configured").await;
                Ok(plan)
            }
            Err(e) => {
                self.set_network_state(&format!("failed: {e}")).await;
                Err(e.into())
            }
        }
    }

    /// Applies the network document handed to the agent as the systemd credential
    /// [`NETWORK_CREDENTIAL`] (`ImportCredential=` in thvc-nodeagent.service), exactly as
    /// `ApplyNetwork(document, false)` would. Never fails the agent: a missing credential
    /// changes nothing, a bad one is logged and shown in `NetworkState` (the host network
    /// stays as it is, so VMs still start on whatever is there). Call before
    /// [`Node::recover`], which starts VMs that need the bridges.
    pub async fn apply_network_credential(&self, credentials_dir: &Path) {
        let path = credentials_dir.join(NETWORK_CREDENTIAL);
        let read = {
            let path = path.clone();
            blocking(move || std::fs::read_to_string(path)).await
        };
        let document = match read.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(
                    "no network credential {}: host network left as it is",
                    path.display()
                );
                return;
            }
            Err(e) => {
                let reason = format!("cannot read the network credential {}: {e}", path.display());
                tracing::error!("{reason}; host network left as it is");
                self.set_network_state(&format!("failed: {reason}")).await;
                return;
            }
        };
        tracing::info!(
            "applying the network document from credential {}",
            path.display()
        );
        match self.apply_network(&document, false).await {
            Ok(report) => {
                let changed = serde_json::from_str::<serde_json::Value>(&report)
                    .ok()
                    .and_then(|r| r.get("changed").and_then(|c| c.as_bool()));
                tracing::info!(
                    ?changed,
                    "network credential {} applied:\n{report}",
                    path.display()
                );
            }
            Err(NodeError::InvalidSpec(problems)) => {
                tracing::error!(
                    "the network credential {} is invalid; host network left as it is:\n{problems}",
                    path.display()
                );
                // One line for the property: the problems joined.
                let problems: Vec<&str> = problems.lines().map(str::trim).collect();
                self.set_network_state(&format!(
                    "failed: network credential {NETWORK_CREDENTIAL} is invalid: {}",
                    problems.join("; ")
                ))
                .await;
            }
            // apply_network already put the failure into NetworkState.
            Err(e) => tracing::error!(
                "applying the network credential {} failed: {e}",
                path.display()
            ),
        }
    }

    pub(super) async fn set_network_state(&self, s: &str) {
        if let Ok(mut g) = self.network_state.lock() {
            *g = s.to_owned();
        }
        let _ = self.publish(NodeEvent::NetworkStateChanged).await;
    }

    /// The host network as it is: links thvc-netconf manages plus physical ones, rendered
    /// as a document (applying it changes nothing). The last applied desired document is
    /// kept in `<state>/network.json`.
    pub async fn get_network(&self) -> Result<String, NodeError> {
        Ok(self.network.show().await?)
    }
}
