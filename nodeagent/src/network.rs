//! The agent's boundary to the host network configurator (`thvc-netconf`). Everything the
//! agent asks of the network goes through [`Network`]: document validation
//! (`parse_document`), plan/apply/show of the host network and one TAP per VM NIC.
//!
//! The configurator opens its rtnetlink connection on first use, so an agent (or a test)
//! that never touches the network needs no netlink access.

use std::path::PathBuf;

use thiserror::Error;
use thvc_netconf::{Netconf, NetconfError, TapSpec};
use tokio::sync::OnceCell;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("{0}")]
    InvalidDocument(String),
    #[error("network configuration is not available: {0}")]
    Unavailable(String),
    #[error("network operation failed: {0}")]
    Failed(String),
}

impl From<NetconfError> for NetError {
    fn from(e: NetconfError) -> Self {
        match e {
            NetconfError::Invalid(v) => {
                NetError::InvalidDocument(v.to_string().trim_end().to_owned())
            }
            NetconfError::Connect(e) => NetError::Unavailable(format!("rtnetlink: {e}")),
            other => NetError::Failed(other.to_string()),
        }
    }
}

/// One TAP device for one VM NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapRequest {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub bridge: String,
    pub vlan: Option<u16>,
    pub mtu: Option<u32>,
}

pub struct Network {
    /// Directory of the configurator's ownership records.
    state_dir: PathBuf,
    netconf: OnceCell<Netconf>,
}

impl Network {
    pub fn new(state_dir: PathBuf) -> Self {
        Network {
            state_dir,
            netconf: OnceCell::new(),
        }
    }

    async fn netconf(&self) -> Result<&Netconf, NetError> {
        self.netconf
            .get_or_try_init(|| async { Ok(Netconf::new(&self.state_dir).await?) })
            .await
    }

    /// Parses and validates a network document; the error lists every problem with its path.
    pub fn validate(document_json: &str) -> Result<thvc_netconf::Document, NetError> {
        thvc_netconf::parse_document(document_json)
            .map_err(|e| NetError::InvalidDocument(e.to_string().trim_end().to_owned()))
    }

    /// The changes applying `document_json` would make, as JSON.
    pub async fn plan(&self, document_json: &str) -> Result<String, NetError> {
        let doc = Self::validate(document_json)?;
        Ok(self.netconf().await?.plan(&doc).await?.to_json_pretty())
    }

    /// Reconciles the host network to `document_json`; returns what was done, as JSON.
    pub async fn apply(&self, document_json: &str) -> Result<String, NetError> {
        let doc = Self::validate(document_json)?;
        let report = self.netconf().await?.apply(&doc).await?;
        serde_json::to_string_pretty(&report).map_err(|e| NetError::Failed(e.to_string()))
    }

    /// The observed host network (the links this node configured), as a document.
    pub async fn show(&self) -> Result<String, NetError> {
        Ok(self.netconf().await?.show().await?.to_json_pretty())
    }

    pub async fn create_tap(&self, tap: &TapRequest) -> Result<(), NetError> {
        let spec = TapSpec {
            name: tap.name.clone(),
            uid: tap.uid,
            gid: tap.gid,
            bridge: Some(tap.bridge.clone()),
            vlan: tap.vlan,
            mtu: tap.mtu,
        };
        self.netconf().await?.create_tap(&spec).await.map_err(|e| {
            NetError::Failed(format!("creating TAP {} on {}: {e}", tap.name, tap.bridge))
        })
    }

    pub async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        self.netconf()
            .await?
            .delete_tap(name)
            .await
            .map_err(|e| NetError::Failed(format!("deleting TAP {name}: {e}")))
    }
}
