//! Declarative host network configurator: a desired-state JSON document in, reconciled
//! kernel (netlink) state out.
//!
//! observe (netlink dumps -> [`ObservedState`]) -> diff ([`compute_plan`], a pure function of
//! observed state, document and [`Ownership`]) -> [`Plan`] -> apply (executor, step by step,
//! recording the links it creates in the ownership file). See README.md.

pub mod addr;
pub mod apply;
pub mod cli;
pub mod document;
pub mod model;
pub mod netconf;
pub mod observe;
pub mod plan;
pub mod state;
pub mod tap;

pub use addr::{IpCidr, MacAddr};
pub use cli::{run_cli, NetAction, NetCommand, DEFAULT_STATE_DIR};
pub use document::{
    parse_document, BondMode, BondSpec, BridgeSpec, Document, LacpRate, LinkKind, LinkSpec,
    LinkState, PortVlanFlags, PortVlans, RouteSpec, ValidationError, ValidationErrors, VlanRange,
    VlanSpec, XmitHashPolicy, Zone,
};
pub use model::{ObservedKind, ObservedLink, ObservedRoute, ObservedState};
pub use netconf::{ApplyReport, Netconf, NetconfError};
pub use plan::{compute_plan, Plan, PlanError, Step};
pub use state::{Ownership, StateError};
pub use tap::{TapError, TapSpec};
