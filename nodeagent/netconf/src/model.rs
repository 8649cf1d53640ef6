//! What the kernel has, as plain data: the planner's input, free of netlink types so plans can
//! be computed (and tested) from a modeled kernel state.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::addr::{IpCidr, MacAddr};
use crate::document::{BondMode, LacpRate, LinkKind, PortVlanFlags, RouteSpec, XmitHashPolicy};

/// Every link of one network namespace, by kernel name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ObservedState {
    pub links: BTreeMap<String, ObservedLink>,
}

impl ObservedState {
    pub fn get(&self, name: &str) -> Option<&ObservedLink> {
        self.links.get(name)
    }

    pub fn insert(&mut self, link: ObservedLink) {
        self.links.insert(link.name.clone(), link);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedLink {
    pub index: u32,
    pub name: String,
    pub kind: ObservedKind,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// The burned-in address, when the driver reports one (bonds rewrite members' `mac`).
    pub perm_mac: Option<MacAddr>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The interface group (IFLA_GROUP): the link's firewall zone, see [`crate::Zone`].
    pub group: u32,
    /// IPv4 forwarding of packets that arrive on this link (its `conf/NAME/forwarding`).
    pub forwarding: bool,
    /// Name of the bond or bridge this link is enslaved to.
    pub master: Option<String>,
    /// Permanent, non-link-local addresses: those an administrator (or we) configured.
    pub addresses: Vec<IpCidr>,
    /// Static and boot-protocol unicast routes leaving through this link.
    pub routes: Vec<ObservedRoute>,
    /// The VLAN table of this link as a bridge port (vid -> flags), when it is one.
    pub port_vlans: Option<BTreeMap<u16, PortVlanFlags>>,
}

impl ObservedLink {
    /// A link as the kernel reports it right after creation; used by tests and the planner.
    pub fn new(index: u32, name: &str, kind: ObservedKind) -> ObservedLink {
        ObservedLink {
            index,
            name: name.to_string(),
            kind,
            mtu: 1500,
            mac: None,
            perm_mac: None,
            up: false,
            group: 0,
            forwarding: false,
            master: None,
            addresses: Vec::new(),
            routes: Vec::new(),
            port_vlans: None,
        }
    }

    /// The MAC a physical link is identified by: the permanent one when known.
    pub fn identity_mac(&self) -> Option<MacAddr> {
        self.perm_mac.filter(|m| !m.is_zero()).or(self.mac)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObservedKind {
    Bond(ObservedBond),
    Bridge(ObservedBridge),
    Vlan {
        parent: Option<String>,
        id: u16,
    },
    /// TUN/TAP device (VM ports; never part of a document).
    Tun {
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Loopback,
    /// Anything else: real NICs (no kind) and veth/dummy/... devices that stand in for them.
    Other {
        kind: Option<String>,
    },
}

impl ObservedKind {
    /// The document kind this kernel link can be managed as.
    pub fn link_kind(&self) -> Option<LinkKind> {
        match self {
            ObservedKind::Bond(_) => Some(LinkKind::Bond),
            ObservedKind::Bridge(_) => Some(LinkKind::Bridge),
            ObservedKind::Vlan { .. } => Some(LinkKind::Vlan),
            ObservedKind::Other { .. } => Some(LinkKind::Physical),
            ObservedKind::Tun { .. } | ObservedKind::Loopback => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ObservedKind::Bond(_) => "bond".into(),
            ObservedKind::Bridge(_) => "bridge".into(),
            ObservedKind::Vlan { .. } => "vlan".into(),
            ObservedKind::Tun { .. } => "tun/tap".into(),
            ObservedKind::Loopback => "loopback".into(),
            ObservedKind::Other { kind: Some(kind) } => kind.clone(),
            ObservedKind::Other { kind: None } => "physical".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ObservedBond {
    /// `None` for a mode this crate does not know.
    pub mode: Option<BondMode>,
    pub miimon_ms: Option<u32>,
    pub updelay_ms: Option<u32>,
    pub downdelay_ms: Option<u32>,
    pub lacp_rate: Option<LacpRate>,
    pub xmit_hash_policy: Option<XmitHashPolicy>,
    pub primary: Option<String>,
    pub min_links: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedBridge {
    pub stp: bool,
    pub vlan_filtering: bool,
    /// The VLAN the kernel gives new ports (pvid, untagged); 0 means none.
    pub default_pvid: u16,
}

impl Default for ObservedBridge {
    fn default() -> Self {
        ObservedBridge {
            stp: false,
            vlan_filtering: false,
            default_pvid: 1,
        }
    }
}

/// A route reduced to what identifies it (the output link is implied by where it is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObservedRoute {
    pub to: IpCidr,
    pub via: Option<IpAddr>,
    pub metric: u32,
    pub table: u32,
}

impl ObservedRoute {
    pub fn from_spec(spec: &RouteSpec) -> ObservedRoute {
        ObservedRoute {
            to: spec.to,
            via: spec.via,
            metric: spec.effective_metric(),
            table: spec.effective_table(),
        }
    }
}
