//! Reads the kernel's network state over rtnetlink into the plain [`ObservedState`] model.
//!
//! Four dumps: links, bridge-port VLANs, addresses, routes. Only what an administrator (or we)
//! configured is kept: permanent non-link-local addresses, static/boot unicast routes.
//! Kernel-made state (link-local, prefix routes, local table, SLAAC) is invisible to the
//! planner and therefore never touched.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{
    AfSpecBridge, AfSpecInet, AfSpecUnspec, BridgeStpState, BridgeVlanInfoFlags, InfoBond,
    InfoBridge, InfoData, InfoKind, InfoTun, InfoVlan, LinkAttribute, LinkExtentMask, LinkFlags,
    LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::addr::{IpCidr, MacAddr};
use crate::document::{BondMode, LacpRate, PortVlanFlags, XmitHashPolicy};
use crate::model::{
    ObservedBond, ObservedBridge, ObservedKind, ObservedLink, ObservedRoute, ObservedState,
};

// IFLA_TUN_* attribute numbers (rtnetlink exposes tun info data as raw attributes).
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;

/// Reads the whole state of the current network namespace.
pub async fn observe(handle: &Handle) -> Result<ObservedState, rtnetlink::Error> {
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    let names: HashMap<u32, String> = messages
        .iter()
        .filter_map(|m| link_name(m).map(|n| (m.header.index, n)))
        .collect();
    let mut by_index: BTreeMap<u32, ObservedLink> = BTreeMap::new();
    for message in &messages {
        if let Some(link) = parse_link(message, &names) {
            by_index.insert(link.index, link);
        }
    }

    let port_vlans: Vec<LinkMessage> = handle
        .link()
        .get()
        .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Brvlan])
        .execute()
        .try_collect()
        .await?;
    for message in &port_vlans {
        let Some(link) = by_index.get_mut(&message.header.index) else {
            continue;
        };
        // The bridge device itself also answers; only ports carry a per-port table we manage.
        if link.master.is_none() {
            continue;
        }
        let mut table = BTreeMap::new();
        for attribute in &message.attributes {
            if let LinkAttribute::AfSpecBridge(specs) = attribute {
                for spec in specs {
                    if let AfSpecBridge::VlanInfo(info) = spec {
                        table.insert(
                            info.vid,
                            PortVlanFlags {
                                pvid: info.flags.contains(BridgeVlanInfoFlags::Pvid),
                                untagged: info.flags.contains(BridgeVlanInfoFlags::Untagged),
                            },
                        );
                    }
                }
            }
        }
        link.port_vlans = Some(table);
    }

    let addresses: Vec<_> = handle.address().get().execute().try_collect().await?;
    for message in addresses {
        let Some(link) = by_index.get_mut(&message.header.index) else {
            continue;
        };
        let mut flags = AddressFlags::empty();
        let mut local = None;
        let mut address = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Flags(f) => flags = *f,
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        if !message.header.flags.contains(AddressHeaderFlags::Permanent)
            && !flags.contains(AddressFlags::Permanent)
        {
            continue; // SLAAC, DHCP-less temporary and other kernel-made addresses.
        }
        // IPv4 reports the interface address in IFA_LOCAL (IFA_ADDRESS is the peer).
        let Some(ip) = local.or(address) else {
            continue;
        };
        if is_ipv6_link_local(&ip) {
            continue; // fe80::/10 belongs to the kernel.
        }
        if let Some(cidr) = IpCidr::new(ip, message.header.prefix_len) {
            link.addresses.push(cidr);
        }
    }

    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessageBuilder::<IpAddr>::new().build();
        request.header.address_family = family;
        request.header.table = 0; // all tables
        let routes: Vec<RouteMessage> = handle.route().get(request).execute().try_collect().await?;
        for message in routes {
            if let Some((oif, route)) = parse_route(&message) {
                if let Some(link) = by_index.get_mut(&oif) {
                    link.routes.push(route);
                }
            }
        }
    }

    let mut state = ObservedState::default();
    for (_, mut link) in by_index {
        link.addresses.sort();
        link.routes.sort();
        state.insert(link);
    }
    Ok(state)
}

fn link_name(message: &LinkMessage) -> Option<String> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

fn parse_link(message: &LinkMessage, names: &HashMap<u32, String>) -> Option<ObservedLink> {
    let name = link_name(message)?;
    let mut mtu = 0;
    let mut group = 0;
    let mut forwarding = false;
    let mut mac = None;
    let mut perm_mac = None;
    let mut master = None;
    let mut lower = None;
    let mut info_kind = None;
    let mut info_data = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Group(g) => group = *g,
            LinkAttribute::AfSpecUnspec(families) => {
                for family in families {
                    if let AfSpecUnspec::Inet(inet) = family {
                        for conf in inet {
                            if let AfSpecInet::DevConf(conf) = conf {
                                forwarding = conf.forwarding != 0;
                            }
                        }
                    }
                }
            }
            LinkAttribute::Address(bytes) => mac = MacAddr::from_bytes(bytes),
            LinkAttribute::PermAddress(bytes) => perm_mac = MacAddr::from_bytes(bytes),
            LinkAttribute::Controller(index) => master = names.get(index).cloned(),
            LinkAttribute::Link(index) => lower = names.get(index).cloned(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => info_kind = Some(kind.clone()),
                        LinkInfo::Data(data) => info_data = Some(data.clone()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let kind = match (info_kind, info_data) {
        _ if message.header.flags.contains(LinkFlags::Loopback) => ObservedKind::Loopback,
        (Some(InfoKind::Bond), data) => ObservedKind::Bond(parse_bond(data, names)),
        (Some(InfoKind::Bridge), data) => ObservedKind::Bridge(parse_bridge(data)),
        (Some(InfoKind::Vlan), data) => {
            let id = match data {
                Some(InfoData::Vlan(infos)) => infos.iter().find_map(|i| match i {
                    InfoVlan::Id(id) => Some(*id),
                    _ => None,
                }),
                _ => None,
            };
            ObservedKind::Vlan {
                parent: lower,
                id: id.unwrap_or(0),
            }
        }
        (Some(InfoKind::Tun), data) => {
            let (uid, gid) = match data {
                Some(InfoData::Tun(infos)) => parse_tun_owner(&infos),
                _ => (None, None),
            };
            ObservedKind::Tun { uid, gid }
        }
        (Some(other), _) => ObservedKind::Other {
            kind: Some(other.to_string()),
        },
        (None, _) => ObservedKind::Other { kind: None },
    };
    Some(ObservedLink {
        index: message.header.index,
        name,
        kind,
        mtu,
        mac,
        perm_mac,
        up: message.header.flags.contains(LinkFlags::Up),
        group,
        forwarding,
        master,
        addresses: Vec::new(),
        routes: Vec::new(),
        port_vlans: None,
    })
}

fn parse_tun_owner(infos: &[InfoTun]) -> (Option<u32>, Option<u32>) {
    let mut uid = None;
    let mut gid = None;
    for info in infos {
        let InfoTun::Other(nla) = info else { continue };
        if nla.value_len() != 4 {
            continue;
        }
        let mut buffer = [0u8; 4];
        nla.emit_value(&mut buffer);
        // (uid_t)-1 means "no owner".
        let value = Some(u32::from_ne_bytes(buffer)).filter(|v| *v != u32::MAX);
        match nla.kind() {
            IFLA_TUN_OWNER => uid = value,
            IFLA_TUN_GROUP => gid = value,
            _ => {}
        }
    }
    (uid, gid)
}

fn parse_bond(data: Option<InfoData>, names: &HashMap<u32, String>) -> ObservedBond {
    use rtnetlink::packet_route::link::{
        BondLacpRate, BondMode as NlMode, BondXmitHashPolicy as NlHash,
    };
    let mut bond = ObservedBond::default();
    let Some(InfoData::Bond(infos)) = data else {
        return bond;
    };
    for info in infos {
        match info {
            InfoBond::Mode(mode) => {
                bond.mode = match mode {
                    NlMode::BalanceRr => Some(BondMode::BalanceRr),
                    NlMode::ActiveBackup => Some(BondMode::ActiveBackup),
                    NlMode::BalanceXor => Some(BondMode::BalanceXor),
                    NlMode::Broadcast => Some(BondMode::Broadcast),
                    NlMode::Ieee8023Ad => Some(BondMode::Lacp),
                    NlMode::BalanceTlb => Some(BondMode::BalanceTlb),
                    NlMode::BalanceAlb => Some(BondMode::BalanceAlb),
                    _ => None,
                }
            }
            InfoBond::MiiMon(v) => bond.miimon_ms = Some(v),
            InfoBond::UpDelay(v) => bond.updelay_ms = Some(v),
            InfoBond::DownDelay(v) => bond.downdelay_ms = Some(v),
            InfoBond::MinLinks(v) => bond.min_links = Some(v),
            InfoBond::Primary(index) => bond.primary = names.get(&index).cloned(),
            InfoBond::AdLacpRate(rate) => {
                bond.lacp_rate = match rate {
                    BondLacpRate::Slow => Some(LacpRate::Slow),
                    BondLacpRate::Fast => Some(LacpRate::Fast),
                    _ => None,
                }
            }
            InfoBond::XmitHashPolicy(policy) => {
                bond.xmit_hash_policy = match policy {
                    NlHash::Layer2 => Some(XmitHashPolicy::Layer2),
                    NlHash::Layer34 => Some(XmitHashPolicy::Layer34),
                    NlHash::Layer23 => Some(XmitHashPolicy::Layer23),
                    NlHash::Encap23 => Some(XmitHashPolicy::Encap23),
                    NlHash::Encap34 => Some(XmitHashPolicy::Encap34),
                    NlHash::VlanSrcMac => Some(XmitHashPolicy::VlanSrcMac),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    bond
}

fn parse_bridge(data: Option<InfoData>) -> ObservedBridge {
    let mut bridge = ObservedBridge::default();
    let Some(InfoData::Bridge(infos)) = data else {
        return bridge;
    };
    for info in infos {
        match info {
            InfoBridge::StpState(state) => bridge.stp = state != BridgeStpState::Disabled,
            InfoBridge::VlanFiltering(on) => bridge.vlan_filtering = on,
            InfoBridge::VlanDefaultPvid(pvid) => bridge.default_pvid = pvid,
            _ => {}
        }
    }
    bridge
}

/// Keeps only routes an administrator could have added: unicast, static or boot protocol,
/// outside the local table, with a single output link.
fn parse_route(message: &RouteMessage) -> Option<(u32, ObservedRoute)> {
    let header = &message.header;
    if header.kind != RouteType::Unicast
        || !matches!(header.protocol, RouteProtocol::Static | RouteProtocol::Boot)
    {
        return None;
    }
    let mut table = u32::from(header.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut metric = 0;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Destination(address) => destination = route_ip(address),
            RouteAttribute::Gateway(address) => gateway = route_ip(address),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table == 255 {
        return None;
    }
    let destination = destination.unwrap_or(match header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    let to = IpCidr::new(destination, header.destination_prefix_length)?;
    Some((
        oif?,
        ObservedRoute {
            to,
            via: gateway,
            metric,
            table,
        },
    ))
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}
