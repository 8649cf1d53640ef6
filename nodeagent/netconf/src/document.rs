//! The desired-state document: types, parsing and validation.
//!
//! Parsing is done link by link so that one broken link does not hide the problems of the
//! others; validation then checks the whole document and reports every problem it finds, each
//! with the JSON path it concerns (`links[3].vlan.id: 5000 is out of range 1..=4094`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::addr::{IpCidr, MacAddr};

/// Linux refuses interface names of 16 bytes or more (IFNAMSIZ includes the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// The main routing table, used when a route names none.
pub const MAIN_TABLE: u32 = 254;
const LOCAL_TABLE: u32 = 255;
/// Kernel default route priorities when none is given.
pub const DEFAULT_METRIC_V4: u32 = 0;
pub const DEFAULT_METRIC_V6: u32 = 1024;

/// The whole desired host network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default)]
    pub links: Vec<LinkSpec>,
}

/// One network link.
///
/// Fields left out are left as the kernel has them, with one exception: on links the
/// configurator creates (bond, vlan, bridge) a missing `addresses`/`routes` means "none".
/// On physical links, addresses and routes are only managed when the field is present, so
/// that listing a NIC to set its MTU never strips the management address off it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub name: String,
    pub kind: LinkKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// For physical links: the permanent MAC address that identifies the NIC (the `name` is
    /// then only the document's name for it). For other kinds: the MAC address to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "LinkState::is_up")]
    pub state: LinkState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<BondSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<VlanSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<IpCidr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteSpec>>,
    /// What the host firewall lets in through this link (its interface group).
    #[serde(default, skip_serializing_if = "Zone::is_isolated")]
    pub zone: Zone,
}

/// The firewall zone of a link, carried as its interface group (`ip link set ... group N`)
/// so the host's static nftables ruleset (image: `/usr/lib/thvc/firewall.nft`) matches it
/// with `iifgroup` and never needs reloading when links come and go.
///
/// Every link the document lists gets its zone's group; links it does not list keep theirs
/// (the kernel's default is 0: isolated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    /// No host service answers and nothing is forwarded to or from it: VM bridges, storage
    /// and any link not known to be safe.
    #[default]
    Isolated,
    /// The management network: sshd (the control plane) and the metrics port answer here.
    Management,
    /// A VM network the host routes (IPv4) to and from the management network, and only
    /// there: no host service answers on it, as on an isolated link. The node forwards for
    /// it only while the document lists one: the links of this zone and the management ones
    /// then forward (their per-link IPv4 `forwarding`), and the firewall's forward chain
    /// admits exactly routed <-> management.
    Routed,
}

impl Zone {
    /// The interface group the ruleset matches (`define management = 1`, `routed = 2`).
    pub fn group(self) -> u32 {
        match self {
            Zone::Isolated => 0,
            Zone::Management => 1,
            Zone::Routed => 2,
        }
    }

    /// The zone an interface group stands for; groups the ruleset does not know are isolated.
    pub fn from_group(group: u32) -> Zone {
        match group {
            1 => Zone::Management,
            2 => Zone::Routed,
            _ => Zone::Isolated,
        }
    }

    fn is_isolated(&self) -> bool {
        *self == Zone::Isolated
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Zone::Isolated => "isolated",
            Zone::Management => "management",
            Zone::Routed => "routed",
        })
    }
}

impl LinkSpec {
    /// A link of `kind` with nothing else set.
    pub fn new(name: &str, kind: LinkKind) -> LinkSpec {
        LinkSpec {
            name: name.to_string(),
            kind,
            mtu: None,
            mac: None,
            state: LinkState::Up,
            bond: None,
            vlan: None,
            bridge: None,
            addresses: None,
            routes: None,
            zone: Zone::Isolated,
        }
    }

    /// The links this one enslaves (bond members or bridge ports).
    pub fn enslaved(&self) -> Vec<&str> {
        match self.kind {
            LinkKind::Bond => self
                .bond
                .iter()
                .flat_map(|b| b.members.iter().map(String::as_str))
                .collect(),
            LinkKind::Bridge => self
                .bridge
                .iter()
                .flat_map(|b| b.ports.iter().map(String::as_str))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Addresses the configurator enforces on this link, `None` when it leaves them alone.
    pub fn managed_addresses(&self) -> Option<Vec<IpCidr>> {
        match (&self.addresses, self.kind) {
            (Some(list), _) => Some(list.clone()),
            (None, LinkKind::Physical) => None,
            (None, _) => Some(Vec::new()),
        }
    }

    /// Routes the configurator enforces on this link, `None` when it leaves them alone.
    pub fn managed_routes(&self) -> Option<Vec<RouteSpec>> {
        match (&self.routes, self.kind) {
            (Some(list), _) => Some(list.clone()),
            (None, LinkKind::Physical) => None,
            (None, _) => Some(Vec::new()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Physical,
    Bond,
    Vlan,
    Bridge,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkKind::Physical => "physical",
            LinkKind::Bond => "bond",
            LinkKind::Vlan => "vlan",
            LinkKind::Bridge => "bridge",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    #[default]
    Up,
    Down,
    /// The link must not exist (only links the configurator created are ever removed).
    Absent,
}

impl LinkState {
    fn is_up(&self) -> bool {
        *self == LinkState::Up
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondSpec {
    pub mode: BondMode,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miimon_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updelay_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downdelay_ms: Option<u32>,
    /// 802.3ad only. Changing it re-creates the bond (the kernel only takes it while down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lacp_rate: Option<LacpRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xmit_hash_policy: Option<XmitHashPolicy>,
    /// active-backup, balance-tlb and balance-alb only: the preferred member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_links: Option<u32>,
}

impl BondSpec {
    pub fn new(mode: BondMode) -> BondSpec {
        BondSpec {
            mode,
            members: Vec::new(),
            miimon_ms: None,
            updelay_ms: None,
            downdelay_ms: None,
            lacp_rate: None,
            xmit_hash_policy: None,
            primary: None,
            min_links: None,
        }
    }
}

/// The kernel's bonding modes, spelled as in `/sys/class/net/*/bonding/mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BondMode {
    #[serde(rename = "balance-rr")]
    BalanceRr,
    #[serde(rename = "active-backup")]
    ActiveBackup,
    #[serde(rename = "balance-xor")]
    BalanceXor,
    #[serde(rename = "broadcast")]
    Broadcast,
    #[serde(rename = "802.3ad")]
    Lacp,
    #[serde(rename = "balance-tlb")]
    BalanceTlb,
    #[serde(rename = "balance-alb")]
    BalanceAlb,
}

impl fmt::Display for BondMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BondMode::BalanceRr => "balance-rr",
            BondMode::ActiveBackup => "active-backup",
            BondMode::BalanceXor => "balance-xor",
            BondMode::Broadcast => "broadcast",
            BondMode::Lacp => "802.3ad",
            BondMode::BalanceTlb => "balance-tlb",
            BondMode::BalanceAlb => "balance-alb",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LacpRate {
    Slow,
    Fast,
}

impl fmt::Display for LacpRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LacpRate::Slow => "slow",
            LacpRate::Fast => "fast",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum XmitHashPolicy {
    #[serde(rename = "layer2")]
    Layer2,
    #[serde(rename = "layer3+4")]
    Layer34,
    #[serde(rename = "layer2+3")]
    Layer23,
    #[serde(rename = "encap2+3")]
    Encap23,
    #[serde(rename = "encap3+4")]
    Encap34,
    #[serde(rename = "vlan+srcmac")]
    VlanSrcMac,
}

impl fmt::Display for XmitHashPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XmitHashPolicy::Layer2 => "layer2",
            XmitHashPolicy::Layer34 => "layer3+4",
            XmitHashPolicy::Layer23 => "layer2+3",
            XmitHashPolicy::Encap23 => "encap2+3",
            XmitHashPolicy::Encap34 => "encap3+4",
            XmitHashPolicy::VlanSrcMac => "vlan+srcmac",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlanSpec {
    pub parent: String,
    pub id: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSpec {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stp: Option<bool>,
    /// 802.1Q VLAN-aware bridge: ports only pass the VLANs listed in `port_vlans`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_filtering: Option<bool>,
    /// Per-port VLAN membership on a VLAN-filtering bridge. Ports not listed keep what the
    /// kernel gave them (the bridge's default PVID, normally VLAN 1 untagged).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_vlans: BTreeMap<String, PortVlans>,
}

/// The VLANs a bridge port carries: `vids` tagged, `pvid` untagged (the native VLAN).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortVlans {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vids: Vec<VlanRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvid: Option<u16>,
}

impl PortVlans {
    /// The exact VLAN table this port must have: vid -> (pvid, untagged).
    pub fn table(&self) -> BTreeMap<u16, PortVlanFlags> {
        let mut table = BTreeMap::new();
        for range in &self.vids {
            for vid in range.first..=range.last {
                table.insert(vid, PortVlanFlags::TAGGED);
            }
        }
        if let Some(pvid) = self.pvid {
            table.insert(pvid, PortVlanFlags::NATIVE);
        }
        table
    }
}

/// How a VLAN is carried on a bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortVlanFlags {
    /// Untagged ingress frames are put in this VLAN.
    pub pvid: bool,
    /// Egress frames of this VLAN leave untagged.
    pub untagged: bool,
}

impl PortVlanFlags {
    pub const TAGGED: PortVlanFlags = PortVlanFlags {
        pvid: false,
        untagged: false,
    };
    pub const NATIVE: PortVlanFlags = PortVlanFlags {
        pvid: true,
        untagged: true,
    };
}

/// One VLAN id or an inclusive range, written `100` or `"200-299"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanRange {
    pub first: u16,
    pub last: u16,
}

impl Serialize for VlanRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            serializer.serialize_u16(self.first)
        } else {
            serializer.collect_str(&format_args!("{}-{}", self.first, self.last))
        }
    }
}

impl<'de> Deserialize<'de> for VlanRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VlanRange, D::Error> {
        struct RangeVisitor;
        impl serde::de::Visitor<'_> for RangeVisitor {
            type Value = VlanRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VLAN id (100) or a range (\"200-299\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<VlanRange, E> {
                let vid = u16::try_from(v)
                    .map_err(|_| E::custom(format!("VLAN id {v} is out of range 1..=4094")))?;
                Ok(VlanRange {
                    first: vid,
                    last: vid,
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<VlanRange, E> {
                Err(E::custom(format!("VLAN id {v} is out of range 1..=4094")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<VlanRange, E> {
                let bad = || E::custom(format!("{v:?} is not a VLAN id or range like \"200-299\""));
                let (first, last) = match v.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (v.trim(), v.trim()),
                };
                Ok(VlanRange {
                    first: first.parse().map_err(|_| bad())?,
                    last: last.parse().map_err(|_| bad())?,
                })
            }
        }
        deserializer.deserialize_any(RangeVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub to: IpCidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Accept a gateway that is not inside any address prefix of the link.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onlink: bool,
}

impl RouteSpec {
    /// The metric the kernel will report for this route.
    pub fn effective_metric(&self) -> u32 {
        self.metric.unwrap_or(if self.to.is_ipv4() {
            DEFAULT_METRIC_V4
        } else {
            DEFAULT_METRIC_V6
        })
    }

    pub fn effective_table(&self) -> u32 {
        self.table.unwrap_or(MAIN_TABLE)
    }
}

/// One problem in a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    /// Where in the document, e.g. `links[3].vlan.id`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a document; nothing is applied while there is any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ValidationErrors(Vec<ValidationError>);

impl ValidationErrors {
    pub fn errors(&self) -> &[ValidationError] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<ValidationError> {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid network document ({} problems):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  {error}")?;
        }
        Ok(())
    }
}

/// Parses and validates a document, reporting every problem at once.
pub fn parse_document(json: &str) -> Result<Document, ValidationErrors> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        ValidationErrors(vec![ValidationError {
            path: String::new(),
            message: format!("not valid JSON: {e}"),
        }])
    })?;
    let mut errors = Vec::new();
    let Some(object) = value.as_object() else {
        return Err(ValidationErrors(vec![ValidationError {
            path: String::new(),
            message: "the document must be a JSON object like {\"links\": [...]}".into(),
        }]));
    };
    for key in object.keys().filter(|k| k.as_str() != "links") {
        errors.push(ValidationError {
            path: key.clone(),
            message: "unknown field, expected `links`".into(),
        });
    }
    let mut links = Vec::new();
    // Names of links that failed to parse: still known, so references to them do not add
    // misleading "unknown link" errors on top of the real one.
    let mut unparsed_names = Vec::new();
    let mut kept = KeptPositions::default();
    match object.get("links") {
        None => {}
        Some(serde_json::Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                let mut item = item.clone();
                errors.extend(take_bad_addresses(index, &mut item, &mut kept));
                match serde_path_to_error::deserialize::<_, LinkSpec>(&item) {
                    Ok(link) => links.push((index, link)),
                    Err(error) => {
                        let inner = error.path().to_string();
                        let path = if inner == "." {
                            format!("links[{index}]")
                        } else {
                            format!("links[{index}].{inner}")
                        };
                        errors.push(ValidationError {
                            path,
                            message: error.into_inner().to_string(),
                        });
                        if let Some(name) = item.get("name").and_then(|n| n.as_str()) {
                            unparsed_names.push(name.to_string());
                        }
                    }
                }
            }
        }
        Some(_) => errors.push(ValidationError {
            path: "links".into(),
            message: "must be an array of links".into(),
        }),
    }
    errors.extend(validate_links(&links, &unparsed_names, &kept));
    if errors.is_empty() {
        Ok(Document {
            links: links.into_iter().map(|(_, link)| link).collect(),
        })
    } else {
        Err(ValidationErrors(errors))
    }
}

/// Reports every unparsable address, route destination and gateway of one link and drops
/// them, so that one typo does not hide the link from the rest of the validation.
fn take_bad_addresses(
    index: usize,
    link: &mut serde_json::Value,
    kept: &mut KeptPositions,
) -> Vec<ValidationError> {
    let mut errors = Vec::new();
    if let Some(serde_json::Value::Array(addresses)) = link.get_mut("addresses") {
        let mut position = 0;
        addresses.retain(|address| {
            let i = position;
            position += 1;
            match address.as_str().map(str::parse::<IpCidr>) {
                Some(Err(e)) => {
                    errors.push(ValidationError {
                        path: format!("links[{index}].addresses[{i}]"),
                        message: e.to_string(),
                    });
                    false
                }
                _ => {
                    kept.addresses.entry(index).or_default().push(i);
                    true
                }
            }
        });
    }
    if let Some(serde_json::Value::Array(routes)) = link.get_mut("routes") {
        let mut position = 0;
        routes.retain(|route| {
            let i = position;
            position += 1;
            let mut keep = true;
            if let Some(Err(e)) = route
                .get("to")
                .and_then(|v| v.as_str())
                .map(str::parse::<IpCidr>)
            {
                errors.push(ValidationError {
                    path: format!("links[{index}].routes[{i}].to"),
                    message: e.to_string(),
                });
                keep = false;
            }
            if let Some(via) = route.get("via").and_then(|v| v.as_str()) {
                if via.parse::<IpAddr>().is_err() {
                    errors.push(ValidationError {
                        path: format!("links[{index}].routes[{i}].via"),
                        message: format!("{via:?} is not an IPv4 or IPv6 address"),
                    });
                    keep = false;
                }
            }
            if keep {
                kept.routes.entry(index).or_default().push(i);
            }
            keep
        });
    }
    errors
}

/// Original positions of the addresses and routes that survived `take_bad_addresses`, so
/// later errors still point at the right element.
#[derive(Default)]
struct KeptPositions {
    addresses: HashMap<usize, Vec<usize>>,
    routes: HashMap<usize, Vec<usize>>,
}

impl KeptPositions {
    fn address(&self, link: usize, i: usize) -> usize {
        self.addresses
            .get(&link)
            .and_then(|p| p.get(i))
            .copied()
            .unwrap_or(i)
    }
    fn route(&self, link: usize, i: usize) -> usize {
        self.routes
            .get(&link)
            .and_then(|p| p.get(i))
            .copied()
            .unwrap_or(i)
    }
}

impl Document {
    /// Re-checks a document built in code (parse_document already does this).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let links: Vec<(usize, LinkSpec)> = self.links.iter().cloned().enumerate().collect();
        let errors = validate_links(&links, &[], &KeptPositions::default());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }

    pub fn to_json_pretty(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn link(&self, name: &str) -> Option<&LinkSpec> {
        self.links.iter().find(|l| l.name == name)
    }
}

/// Why a name is not a valid Linux interface name, if it is not.
pub fn check_ifname(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("interface name is empty".into())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "interface name {name:?} is {} bytes long, Linux allows at most {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not a valid interface name"))
    } else {
        name.chars()
            .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
            .map(|c| {
                format!(
                    "interface name {name:?} contains {c:?}; '/', ':' and whitespace are not allowed"
                )
            })
    }
}

struct Checker<'a> {
    errors: Vec<ValidationError>,
    kept: &'a KeptPositions,
    by_name: HashMap<&'a str, (usize, &'a LinkSpec)>,
    unparsed: &'a [String],
}

impl Checker<'_> {
    fn error(&mut self, path: String, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path,
            message: message.into(),
        });
    }
}

fn validate_links(
    links: &[(usize, LinkSpec)],
    unparsed: &[String],
    kept: &KeptPositions,
) -> Vec<ValidationError> {
    let mut check = Checker {
        errors: Vec::new(),
        kept,
        by_name: HashMap::new(),
        unparsed,
    };
    for (index, link) in links {
        let path = format!("links[{index}].name");
        if let Some(problem) = check_ifname(&link.name) {
            check.error(path.clone(), problem);
        }
        if let Some((first, _)) = check.by_name.get(link.name.as_str()) {
            let first = *first;
            check.error(
                path,
                format!(
                    "duplicate link name {:?} (first defined at links[{first}])",
                    link.name
                ),
            );
        } else {
            check.by_name.insert(link.name.as_str(), (*index, link));
        }
    }
    let mut physical_macs: HashMap<MacAddr, usize> = HashMap::new();
    let no_members: Vec<String> = Vec::new();
    // Which master enslaves each link, to catch links enslaved twice.
    let mut enslaved_by: HashMap<&str, &str> = HashMap::new();
    for (index, link) in links {
        let at = |field: &str| format!("links[{index}].{field}");
        check_kind_sections(&mut check, *index, link);
        if let Some(mtu) = link.mtu {
            if !(68..=65535).contains(&mtu) {
                check.error(at("mtu"), format!("{mtu} is out of range 68..=65535"));
            } else if mtu < 1280 && link.addresses.iter().flatten().any(|a| !a.is_ipv4()) {
                check.error(
                    at("mtu"),
                    format!("{mtu} is below 1280, the minimum for the IPv6 addresses of this link"),
                );
            }
        }
        if link.kind == LinkKind::Physical {
            if link.state == LinkState::Absent {
                check.error(
                    at("state"),
                    "physical links cannot be absent: they are never created or deleted",
                );
            }
            if let Some(mac) = link.mac {
                if let Some(first) = physical_macs.insert(mac, *index) {
                    check.error(
                        at("mac"),
                        format!("MAC {mac} already identifies links[{first}]"),
                    );
                }
            }
        } else if let Some(mac) = link.mac {
            if mac.0[0] & 1 == 1 || mac.is_zero() {
                check.error(at("mac"), format!("{mac} is not a unicast MAC address"));
            }
        }
        if link.state == LinkState::Absent {
            // Nothing else of an absent link matters, but a stray section is likely a mistake.
            continue;
        }
        // Bond members and bridge ports.
        let (list_path, list) = match (&link.bond, &link.bridge, link.kind) {
            (Some(bond), _, LinkKind::Bond) => ("bond.members", &bond.members),
            (_, Some(bridge), LinkKind::Bridge) => ("bridge.ports", &bridge.ports),
            _ => ("", &no_members),
        };
        for (i, member) in list.iter().enumerate() {
            let path = at(&format!("{list_path}[{i}]"));
            if member == &link.name {
                check.error(path, format!("{:?} cannot enslave itself", link.name));
                continue;
            }
            if let Some(other) = enslaved_by.get(member.as_str()) {
                check.error(
                    path,
                    format!("{member:?} is already enslaved to {other:?}; a link has one master"),
                );
                continue;
            }
            enslaved_by.insert(member.as_str(), link.name.as_str());
            let Some(target) = check_reference(&mut check, path.clone(), member) else {
                continue;
            };
            match (link.kind, target.kind) {
                (LinkKind::Bond, LinkKind::Physical) => {}
                (LinkKind::Bond, other) => check.error(
                    path.clone(),
                    format!("bond members must be physical links, {member:?} is a {other}"),
                ),
                (LinkKind::Bridge, LinkKind::Bridge) => check.error(
                    path.clone(),
                    format!("{member:?} is a bridge; Linux cannot enslave a bridge to a bridge"),
                ),
                _ => {}
            }
            if target.addresses.as_ref().is_some_and(|a| !a.is_empty())
                || target.routes.as_ref().is_some_and(|r| !r.is_empty())
            {
                check.error(
                    path.clone(),
                    format!(
                        "{member:?} has addresses or routes but is enslaved to {:?}; \
                         put them on the master",
                        link.name
                    ),
                );
            }
            if let (Some(master_mtu), Some(member_mtu), LinkKind::Bond) =
                (link.mtu, target.mtu, link.kind)
            {
                if master_mtu != member_mtu {
                    check.error(
                        path,
                        format!(
                            "member {member:?} has mtu {member_mtu} but bond {:?} has {master_mtu}; \
                             the bond sets its members' MTU",
                            link.name
                        ),
                    );
                }
            }
        }
        if let (Some(vlan), LinkKind::Vlan) = (&link.vlan, link.kind) {
            if !(1..=4094).contains(&vlan.id) {
                check.error(
                    at("vlan.id"),
                    format!("{} is out of range 1..=4094", vlan.id),
                );
            }
            if vlan.parent == link.name {
                check.error(at("vlan.parent"), "a VLAN cannot be its own parent");
            } else {
                check_reference(&mut check, at("vlan.parent"), &vlan.parent);
            }
        }
        if let (Some(bond), LinkKind::Bond) = (&link.bond, link.kind) {
            check_bond(&mut check, *index, bond);
        }
        if let (Some(bridge), LinkKind::Bridge) = (&link.bridge, link.kind) {
            check_bridge(&mut check, *index, bridge);
        }
        check_addresses_and_routes(&mut check, *index, link);
    }
    // Two VLANs with the same parent and id cannot coexist.
    let mut vlan_keys: HashMap<(&str, u16), usize> = HashMap::new();
    for (index, link) in links {
        if let (Some(vlan), LinkKind::Vlan, false) =
            (&link.vlan, link.kind, link.state == LinkState::Absent)
        {
            if let Some(first) = vlan_keys.insert((vlan.parent.as_str(), vlan.id), *index) {
                check.error(
                    format!("links[{index}].vlan.id"),
                    format!(
                        "VLAN {} on {:?} is already defined by links[{first}]",
                        vlan.id, vlan.parent
                    ),
                );
            }
        }
    }
    check_cycles(&mut check, links);
    check.errors
}

fn check_kind_sections(check: &mut Checker<'_>, index: usize, link: &LinkSpec) {
    let at = |field: &str| format!("links[{index}].{field}");
    let sections = [
        ("bond", link.bond.is_some(), LinkKind::Bond),
        ("vlan", link.vlan.is_some(), LinkKind::Vlan),
        ("bridge", link.bridge.is_some(), LinkKind::Bridge),
    ];
    for (section, present, kind) in sections {
        if present && link.kind != kind {
            check.error(
                at(section),
                format!(
                    "`{section}` is only allowed on links of kind {kind}, this one is {}",
                    link.kind
                ),
            );
        }
    }
    if link.state != LinkState::Absent {
        if link.kind == LinkKind::Bond && link.bond.is_none() {
            check.error(
                at("bond"),
                "a bond needs a `bond` section with at least `mode`",
            );
        }
        if link.kind == LinkKind::Vlan && link.vlan.is_none() {
            check.error(
                at("vlan"),
                "a vlan needs a `vlan` section with `parent` and `id`",
            );
        }
    }
}

/// Resolves a reference to another link of the document, reporting why it cannot be used.
fn check_reference<'a>(check: &mut Checker<'a>, path: String, name: &str) -> Option<&'a LinkSpec> {
    match check.by_name.get(name) {
        Some((target_index, target)) => {
            if target.state == LinkState::Absent {
                check.error(
                    path,
                    format!("{name:?} (links[{target_index}]) is marked absent"),
                );
                None
            } else {
                Some(*target)
            }
        }
        None if check.unparsed.iter().any(|n| n == name) => None,
        None => {
            check.error(
                path,
                format!(
                    "{name:?} is not defined in the document (declare NICs with kind \"physical\")"
                ),
            );
            None
        }
    }
}

fn check_bond(check: &mut Checker<'_>, index: usize, bond: &BondSpec) {
    let at = |field: &str| format!("links[{index}].bond.{field}");
    if bond.lacp_rate.is_some() && bond.mode != BondMode::Lacp {
        check.error(
            at("lacp_rate"),
            format!("only applies to mode 802.3ad, this bond is {}", bond.mode),
        );
    }
    if let Some(primary) = &bond.primary {
        if !matches!(
            bond.mode,
            BondMode::ActiveBackup | BondMode::BalanceTlb | BondMode::BalanceAlb
        ) {
            check.error(
                at("primary"),
                format!(
                    "only applies to modes active-backup, balance-tlb and balance-alb, this bond is {}",
                    bond.mode
                ),
            );
        }
        if !bond.members.contains(primary) {
            check.error(
                at("primary"),
                format!("{primary:?} is not a member of this bond"),
            );
        }
    }
    for (field, value, max) in [
        ("miimon_ms", bond.miimon_ms, i32::MAX as u32),
        ("updelay_ms", bond.updelay_ms, i32::MAX as u32),
        ("downdelay_ms", bond.downdelay_ms, i32::MAX as u32),
        ("min_links", bond.min_links, i32::MAX as u32),
    ] {
        if let Some(value) = value {
            if value > max {
                check.error(at(field), format!("{value} is out of range 0..={max}"));
            }
        }
    }
    for (field, value) in [
        ("updelay_ms", bond.updelay_ms),
        ("downdelay_ms", bond.downdelay_ms),
    ] {
        if let (Some(delay), Some(miimon)) = (value, bond.miimon_ms) {
            if miimon > 0 && delay % miimon != 0 {
                check.error(
                    at(field),
                    format!("{delay} is not a multiple of miimon_ms {miimon}"),
                );
            }
        }
    }
}

fn check_bridge(check: &mut Checker<'_>, index: usize, bridge: &BridgeSpec) {
    let at = |field: &str| format!("links[{index}].bridge.{field}");
    if !bridge.port_vlans.is_empty() && bridge.vlan_filtering != Some(true) {
        check.error(
            at("port_vlans"),
            "port VLANs need \"vlan_filtering\": true on the bridge",
        );
    }
    for (port, vlans) in &bridge.port_vlans {
        let path = at(&format!("port_vlans.{port}"));
        if !bridge.ports.contains(port) {
            check.error(
                path.clone(),
                format!("{port:?} is not one of this bridge's ports"),
            );
        }
        for (i, range) in vlans.vids.iter().enumerate() {
            if !(1..=4094).contains(&range.first) || !(1..=4094).contains(&range.last) {
                check.error(
                    format!("{path}.vids[{i}]"),
                    format!("{}-{} is out of range 1..=4094", range.first, range.last),
                );
            } else if range.first > range.last {
                check.error(
                    format!("{path}.vids[{i}]"),
                    format!("range {}-{} is backwards", range.first, range.last),
                );
            }
        }
        if let Some(pvid) = vlans.pvid {
            if !(1..=4094).contains(&pvid) {
                check.error(
                    format!("{path}.pvid"),
                    format!("{pvid} is out of range 1..=4094"),
                );
            }
        }
    }
}

fn check_addresses_and_routes(check: &mut Checker<'_>, index: usize, link: &LinkSpec) {
    let at = |field: &str| format!("links[{index}].{field}");
    let addresses = link.addresses.clone().unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (i, cidr) in addresses.iter().enumerate() {
        let path = at(&format!("addresses[{}]", check.kept.address(index, i)));
        let ip = cidr.addr();
        if !seen.insert(ip) {
            check.error(path, format!("address {ip} is listed twice"));
            continue;
        }
        let problem = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() => {
                Some("is not a host address")
            }
            IpAddr::V4(v4) if v4.is_loopback() => Some("is a loopback address"),
            IpAddr::V4(v4) if v4.is_multicast() => Some("is a multicast address"),
            IpAddr::V4(v4)
                if cidr.prefix_len() < 31
                    && (cidr.network().addr() == ip
                        || u32::from(v4) | (u32::MAX >> cidr.prefix_len()) == u32::from(v4)) =>
            {
                Some("is the network or broadcast address of its prefix")
            }
            IpAddr::V6(v6) if v6.is_unspecified() => Some("is not a host address"),
            IpAddr::V6(v6) if v6.is_loopback() => Some("is a loopback address"),
            IpAddr::V6(v6) if v6.is_multicast() => Some("is a multicast address"),
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
                Some("is link-local; the kernel manages fe80::/10 addresses itself")
            }
            _ => None,
        };
        if let Some(problem) = problem {
            check.error(path, format!("{cidr} {problem}"));
        }
    }
    let routes = link.routes.clone().unwrap_or_default();
    if !routes.is_empty() && link.state == LinkState::Down {
        check.error(
            at("routes"),
            "routes need the link up; the kernel refuses gateways on a link that is down",
        );
    }
    let mut route_keys = BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        let position = check.kept.route(index, i);
        let path = |field: &str| at(&format!("routes[{position}].{field}"));
        if route.to.network() != route.to {
            check.error(
                path("to"),
                format!(
                    "{} has host bits set; did you mean {}?",
                    route.to,
                    route.to.network()
                ),
            );
        }
        if let Some(table) = route.table {
            if table == 0 || table == LOCAL_TABLE || table == 253 {
                check.error(
                    path("table"),
                    format!("table {table} is reserved (0 unspec, 253 default, 255 local)"),
                );
            }
        }
        if let Some(via) = route.via {
            if via.is_ipv4() != route.to.is_ipv4() {
                check.error(
                    path("via"),
                    format!(
                        "gateway {via} is {} but the destination {} is {}",
                        family(&via),
                        route.to,
                        family(&route.to.addr())
                    ),
                );
            } else if !route.onlink && !is_link_local(&via) {
                let reachable = addresses.iter().any(|a| a.contains(&via));
                if !reachable {
                    check.error(
                        path("via"),
                        format!(
                            "gateway {via} is not inside any {} address prefix of {:?}; add an \
                             address in its subnet or set \"onlink\": true",
                            family(&via),
                            link.name
                        ),
                    );
                }
            }
        }
        let key = (
            route.to,
            route.effective_metric(),
            route.effective_table(),
            route.via,
        );
        if !route_keys.insert(key) {
            check.error(path("to"), format!("route to {} is listed twice", route.to));
        }
    }
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Reports dependency cycles: a VLAN depends on its parent, a master on its members.
fn check_cycles(check: &mut Checker<'_>, links: &[(usize, LinkSpec)]) {
    let graph: BTreeMap<&str, Vec<&str>> = links
        .iter()
        .filter(|(_, l)| l.state != LinkState::Absent)
        .map(|(_, l)| (l.name.as_str(), dependencies(l)))
        .collect();
    let index_of: HashMap<&str, usize> = links.iter().map(|(i, l)| (l.name.as_str(), *i)).collect();
    let mut reported: BTreeSet<Vec<&str>> = BTreeSet::new();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut mark: HashMap<&str, u8> = HashMap::new();
    for start in graph.keys() {
        let mut path = Vec::new();
        find_cycles(start, &graph, &mut mark, &mut path, &mut reported);
    }
    for cycle in reported {
        let first = cycle.first().copied().unwrap_or_default();
        let index = index_of.get(first).copied().unwrap_or_default();
        let mut text: Vec<&str> = cycle.clone();
        text.push(first);
        check.error(
            format!("links[{index}]"),
            format!("dependency cycle: {}", text.join(" -> ")),
        );
    }
}

fn find_cycles<'a>(
    node: &'a str,
    graph: &BTreeMap<&'a str, Vec<&'a str>>,
    mark: &mut HashMap<&'a str, u8>,
    path: &mut Vec<&'a str>,
    reported: &mut BTreeSet<Vec<&'a str>>,
) {
    match mark.get(node) {
        Some(2) => return,
        Some(1) => {
            if let Some(pos) = path.iter().position(|n| *n == node) {
                let mut cycle: Vec<&str> = path[pos..].to_vec();
                // Rotate so the same cycle found from another start is reported once.
                if let Some(min_pos) = cycle
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, n)| **n)
                    .map(|(i, _)| i)
                {
                    cycle.rotate_left(min_pos);
                }
                reported.insert(cycle);
            }
            return;
        }
        _ => {}
    }
    mark.insert(node, 1);
    path.push(node);
    for next in graph.get(node).into_iter().flatten() {
        if graph.contains_key(next) {
            find_cycles(next, graph, mark, path, reported);
        }
    }
    path.pop();
    mark.insert(node, 2);
}

/// The links that must exist and be configured before this one (lower layers first).
pub fn dependencies(link: &LinkSpec) -> Vec<&str> {
    let mut deps = link.enslaved();
    if let (Some(vlan), LinkKind::Vlan) = (&link.vlan, link.kind) {
        deps.push(vlan.parent.as_str());
    }
    deps
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{ "links": [
      {"name": "eth0", "kind": "physical", "mtu": 9000},
      {"name": "eth1", "kind": "physical", "mtu": 9000},
      {"name": "bond0", "kind": "bond", "mtu": 9000, "bond": {"mode": "802.3ad", "members": ["eth0", "eth1"], "miimon_ms": 100}},
      {"name": "bond0.100", "kind": "vlan", "vlan": {"parent": "bond0", "id": 100}},
      {"name": "br100", "kind": "bridge", "bridge": {"ports": ["bond0.100"], "stp": false},
       "addresses": ["10.100.0.5/24", "fd00:100::5/64"],
       "routes": [{"to": "0.0.0.0/0", "via": "10.100.0.1", "metric": 100}]},
      {"name": "old-br", "kind": "bridge", "state": "absent"} ] }"#;

    fn messages(json: &str) -> Vec<String> {
        match parse_document(json) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.errors().iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn example_document_is_valid_and_round_trips() {
        let doc = parse_document(EXAMPLE).unwrap();
        assert_eq!(doc.links.len(), 6);
        assert_eq!(doc.links[2].bond.as_ref().unwrap().mode, BondMode::Lacp);
        let again = parse_document(&doc.to_json_pretty()).unwrap();
        assert_eq!(doc, again);
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let json = r#"{ "links": [
          {"name": "eth0", "kind": "physical"},
          {"name": "eth0", "kind": "physical"},
          {"name": "a-very-long-interface-name", "kind": "bridge"},
          {"name": "v5000", "kind": "vlan", "vlan": {"parent": "eth0", "id": 5000}},
          {"name": "bond0", "kind": "bond", "bond": {"mode": "active-backup", "members": ["eth0", "ghost"], "lacp_rate": "fast"}},
          {"name": "br0", "kind": "bridge", "bridge": {"ports": ["eth0"]},
           "addresses": ["10.0.0.5/24"],
           "routes": [{"to": "0.0.0.0/0", "via": "fd00::1"}, {"to": "10.9.0.0/16", "via": "192.168.7.1"}, {"to": "10.8.0.1/16"}]}
        ]}"#;
        let errors = messages(json);
        let expected = [
            "links[1].name: duplicate link name \"eth0\" (first defined at links[0])",
            "links[2].name: interface name \"a-very-long-interface-name\" is 26 bytes long, Linux allows at most 15",
            "links[3].vlan.id: 5000 is out of range 1..=4094",
            "links[4].bond.members[1]: \"ghost\" is not defined in the document (declare NICs with kind \"physical\")",
            "links[4].bond.lacp_rate: only applies to mode 802.3ad, this bond is active-backup",
            "links[5].bridge.ports[0]: \"eth0\" is already enslaved to \"bond0\"; a link has one master",
            "links[5].routes[0].via: gateway fd00::1 is IPv6 but the destination 0.0.0.0/0 is IPv4",
            "links[5].routes[1].via: gateway 192.168.7.1 is not inside any IPv4 address prefix of \"br0\"; add an address in its subnet or set \"onlink\": true",
            "links[5].routes[2].to: 10.8.0.1/16 has host bits set; did you mean 10.8.0.0/16?",
        ];
        for line in expected {
            assert!(
                errors.iter().any(|e| e == line),
                "missing {line:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn structural_errors_are_reported_per_link() {
        let json = r#"{ "links": [
          {"name": "eth0", "kind": "physical", "speed": 10},
          {"name": "br0", "kind": "bridge", "addresses": ["10.0.0.300/24", "10.0.0.1/24"],
           "routes": [{"to": "10/8"}, {"to": "10.1.0.0/16", "via": "10.0.0.x"}, {"to": "10.2.0.0/16", "via": "10.5.0.1"}]},
          {"name": "v1", "kind": "vlan", "vlan": {"parent": "br0", "id": 70000}},
          {"name": "x", "kind": "tunnel"},
          {"name": "br1", "kind": "bridge", "bridge": {"ports": ["eth0"]}}
        ], "version": 2 }"#;
        let errors = messages(json);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("version: unknown field")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[0].speed: unknown field `speed`")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[1].addresses[0]: \"10.0.0.300/24\" is not a CIDR")),
            "{errors:#?}"
        );
        assert!(
            errors.contains(
                &"links[1].routes[1].via: \"10.0.0.x\" is not an IPv4 or IPv6 address".to_string()
            ),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[1].routes[0].to: \"10/8\" is not a CIDR")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[2].vlan.id: invalid value")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[3].kind: unknown variant `tunnel`")),
            "{errors:#?}"
        );
        // eth0 failed to parse but is known: no extra "not defined" error for br1's port.
        // br0 is still validated past its typos.
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("links[1].routes[2].via: gateway 10.5.0.1 is not inside")),
            "{errors:#?}"
        );
        assert_eq!(errors.len(), 8, "{errors:#?}");
    }

    #[test]
    fn detects_cycles() {
        let json = r#"{ "links": [
          {"name": "br0", "kind": "bridge", "bridge": {"ports": ["br0.5"]}},
          {"name": "br0.5", "kind": "vlan", "vlan": {"parent": "br0", "id": 5}},
          {"name": "a", "kind": "vlan", "vlan": {"parent": "b", "id": 5}},
          {"name": "b", "kind": "vlan", "vlan": {"parent": "a", "id": 6}}
        ]}"#;
        let errors = messages(json);
        assert!(
            errors.contains(&"links[2]: dependency cycle: a -> b -> a".to_string()),
            "{errors:#?}"
        );
        assert!(
            errors.contains(&"links[0]: dependency cycle: br0 -> br0.5 -> br0".to_string()),
            "{errors:#?}"
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
    }

    #[test]
    fn misc_rules() {
        let json = r#"{ "links": [
          {"name": "eth0", "kind": "physical", "state": "absent", "mac": "52:54:00:00:00:01"},
          {"name": "eth1", "kind": "physical", "mac": "52:54:00:00:00:01", "mtu": 9000},
          {"name": "gone", "kind": "bridge", "state": "absent"},
          {"name": "bond0", "kind": "bond", "mtu": 1500, "bond": {"mode": "active-backup", "members": ["eth1"], "primary": "eth9", "miimon_ms": 100, "updelay_ms": 150}},
          {"name": "br0", "kind": "bridge", "vlan": {"parent": "eth1", "id": 3}, "bridge": {"ports": ["gone"], "port_vlans": {"gone": {"vids": [1, "10-5"]}}},
           "addresses": ["10.0.0.0/24", "fe80::1/64", "fd00::1/64", "fd00::1/64"], "mtu": 1000, "state": "down",
           "routes": [{"to": "fd01::/64", "via": "fe80::1", "table": 255}]}
        ]}"#;
        let errors = messages(json);
        let expected = [
            "links[0].state: physical links cannot be absent: they are never created or deleted",
            "links[1].mac: MAC 52:54:00:00:00:01 already identifies links[0]",
            "links[3].bond.members[0]: member \"eth1\" has mtu 9000 but bond \"bond0\" has 1500; the bond sets its members' MTU",
            "links[3].bond.primary: \"eth9\" is not a member of this bond",
            "links[3].bond.updelay_ms: 150 is not a multiple of miimon_ms 100",
            "links[4].vlan: `vlan` is only allowed on links of kind vlan, this one is bridge",
            "links[4].mtu: 1000 is below 1280, the minimum for the IPv6 addresses of this link",
            "links[4].bridge.ports[0]: \"gone\" (links[2]) is marked absent",
            "links[4].bridge.port_vlans: port VLANs need \"vlan_filtering\": true on the bridge",
            "links[4].bridge.port_vlans.gone.vids[1]: range 10-5 is backwards",
            "links[4].addresses[0]: 10.0.0.0/24 is the network or broadcast address of its prefix",
            "links[4].addresses[1]: fe80::1/64 is link-local; the kernel manages fe80::/10 addresses itself",
            "links[4].addresses[3]: address fd00::1 is listed twice",
            "links[4].routes: routes need the link up; the kernel refuses gateways on a link that is down",
            "links[4].routes[0].table: table 255 is reserved (0 unspec, 253 default, 255 local)",
        ];
        for line in expected {
            assert!(
                errors.iter().any(|e| e == line),
                "missing {line:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn not_json_or_wrong_shape() {
        assert!(messages("{").first().unwrap().starts_with("not valid JSON"));
        assert_eq!(
            messages("[]"),
            vec!["the document must be a JSON object like {\"links\": [...]}".to_string()]
        );
        assert_eq!(
            messages(r#"{"links": 3}"#),
            vec!["links: must be an array of links".to_string()]
        );
        assert!(parse_document("{}").unwrap().links.is_empty());
    }

    #[test]
    fn port_vlan_table() {
        let vlans = PortVlans {
            vids: vec![
                VlanRange {
                    first: 10,
                    last: 12,
                },
                VlanRange {
                    first: 20,
                    last: 20,
                },
            ],
            pvid: Some(11),
        };
        let table = vlans.table();
        assert_eq!(table.len(), 4);
        assert_eq!(table[&11], PortVlanFlags::NATIVE);
        assert_eq!(table[&10], PortVlanFlags::TAGGED);
    }
}
