//! The agent's boundary to the host network configurator (`thvc-netconf`). Everything the
//! agent asks of the network goes through [`Network`], so the rest of the agent does not
//! depend on the configurator's internals.
//!
//! Document parsing and validation use `thvc_netconf::parse_document`. Planning, applying,
//! observing and TAP management call the configurator's `Netconf` API; until that API is in
//! the netconf crate, those operations report a clear `Network` error (VMs without NICs are
//! unaffected).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("{0}")]
    InvalidDocument(String),
    #[error("network configuration is not available: {0}")]
    Unavailable(String),
    #[error("network operation failed: {0}")]
    Failed(String),
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
    /// Directory for the configurator's own state (ownership records).
    #[allow(dead_code)]
    state_dir: PathBuf,
}

const NOT_INTEGRATED: &str =
    "this build of thvc-nodeagent does not yet include the netconf reconciler (plan/apply/show/TAPs)";

impl Network {
    pub fn new(state_dir: PathBuf) -> Self {
        Network { state_dir }
    }

    /// Parses and validates a network document; the error lists every problem with its path.
    pub fn validate(document_json: &str) -> Result<(), NetError> {
        thvc_netconf::parse_document(document_json)
            .map(|_| ())
            .map_err(|e| NetError::InvalidDocument(e.to_string().trim_end().to_owned()))
    }

    /// The changes applying `document_json` would make, as JSON.
    pub async fn plan(&self, document_json: &str) -> Result<String, NetError> {
        Self::validate(document_json)?;
        Err(NetError::Unavailable(NOT_INTEGRATED.to_owned()))
    }

    /// Reconciles the host network to `document_json`; returns the executed plan as JSON.
    pub async fn apply(&self, document_json: &str) -> Result<String, NetError> {
        Self::validate(document_json)?;
        Err(NetError::Unavailable(NOT_INTEGRATED.to_owned()))
    }

    /// The observed host network, as JSON.
    pub async fn show(&self) -> Result<String, NetError> {
        Err(NetError::Unavailable(NOT_INTEGRATED.to_owned()))
    }

    pub async fn create_tap(&self, tap: &TapRequest) -> Result<(), NetError> {
        Err(NetError::Unavailable(format!(
            "cannot create TAP {} on bridge {}: {NOT_INTEGRATED}",
            tap.name, tap.bridge
        )))
    }

    pub async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        let _ = name;
        Ok(())
    }
}
