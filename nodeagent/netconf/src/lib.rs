//! Declarative host network configurator: a desired-state JSON document in, reconciled
//! kernel (netlink) state out. See README.md for the architecture.

pub mod addr;
pub mod document;

pub use addr::{IpCidr, MacAddr};
pub use document::{
    parse_document, BondMode, BondSpec, BridgeSpec, Document, LacpRate, LinkKind, LinkSpec,
    LinkState, PortVlanFlags, PortVlans, RouteSpec, ValidationError, ValidationErrors, VlanRange,
    VlanSpec, XmitHashPolicy,
};
pub mod model;
pub mod plan;
pub mod state;

pub use model::{ObservedKind, ObservedLink, ObservedRoute, ObservedState};
pub use plan::{compute_plan, Plan, PlanError, Step};
pub use state::{Ownership, StateError};
