//! The executor: turns one [`Step`] into rtnetlink requests.
//!
//! Link names are resolved to ifindexes when a step runs (cached, refreshed on a miss), so a
//! link that vanished or never existed fails its own step with its own name. Deletes that
//! find nothing to delete and adds that find the thing already there count as done: the
//! kernel may have removed a route together with its address, for example.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_core::{DefaultNla, NLA_F_NESTED};
use rtnetlink::packet_route::link::{
    AfSpecInet, AfSpecUnspec, BondLacpRate, BondMode as NlMode, BondXmitHashPolicy as NlHash,
    BridgeStpState, BridgeVlanInfoFlags, InfoBond, InfoKind, LinkAttribute,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope, RouteType};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBond, LinkBridge, LinkBridgeVlan, LinkMessageBuilder,
    LinkUnspec, LinkVlan, RouteMessageBuilder,
};

use crate::document::{BondMode, LacpRate, XmitHashPolicy};
use crate::model::ObservedRoute;
use crate::plan::{BondOptions, NewLink, PortVlanEntry, Step};

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("link {0} does not exist")]
    NoSuchLink(String),
    #[error("{context}: {}", describe_netlink(.source))]
    Netlink {
        context: &'static str,
        source: rtnetlink::Error,
    },
    #[error("invalid route: {0}")]
    Route(String),
}

fn describe_netlink(error: &rtnetlink::Error) -> String {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().to_string(),
        other => other.to_string(),
    }
}

/// The positive errno of a netlink error reply, if it is one.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

/// Runs steps against one netlink connection.
pub struct Executor {
    handle: Handle,
    indexes: HashMap<String, u32>,
}

/// What running a step produced that the caller must record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A link was created with this ifindex.
    Created(u32),
    /// The step found its work already done (e.g. the route vanished with its address).
    AlreadyDone,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("indexes", &self.indexes)
            .finish()
    }
}

/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_FORWARDING: u32 } } }`: the
/// link's `net.ipv4.conf.NAME.forwarding` set through rtnetlink, which needs no writable
/// /proc/sys (the agent runs with ProtectKernelTunables=). Built by hand because the
/// crate's `AfSpecInet::DevConfRequest` leaves out zero values, so it cannot turn one off.
fn ipv4_forwarding(on: bool) -> LinkAttribute {
    const IFLA_INET_CONF: u16 = 1;
    const IPV4_DEVCONF_FORWARDING: u16 = 1;
    let mut conf = Vec::with_capacity(8);
    conf.extend_from_slice(&8u16.to_ne_bytes());
    conf.extend_from_slice(&IPV4_DEVCONF_FORWARDING.to_ne_bytes());
    conf.extend_from_slice(&u32::from(on).to_ne_bytes());
    LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![AfSpecInet::Other(
        DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, conf),
    )])])
}

fn nl(context: &'static str) -> impl FnOnce(rtnetlink::Error) -> ExecError {
    move |source| ExecError::Netlink { context, source }
}

impl Executor {
    pub fn new(handle: Handle, known: impl IntoIterator<Item = (String, u32)>) -> Executor {
        Executor {
            handle,
            indexes: known.into_iter().collect(),
        }
    }

    /// The ifindex of `name`, asking the kernel when it is not cached.
    pub async fn index(&mut self, name: &str) -> Result<u32, ExecError> {
        if let Some(index) = self.indexes.get(name) {
            return Ok(*index);
        }
        let found = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match found {
            Ok(Some(message)) => {
                self.indexes.insert(name.to_string(), message.header.index);
                Ok(message.header.index)
            }
            Ok(None) => Err(ExecError::NoSuchLink(name.to_string())),
            Err(e) if errno(&e) == Some(libc::ENODEV) => {
                Err(ExecError::NoSuchLink(name.to_string()))
            }
            Err(source) => Err(ExecError::Netlink {
                context: "looking up link",
                source,
            }),
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.indexes.remove(name);
    }

    pub async fn run(&mut self, step: &Step) -> Result<Outcome, ExecError> {
        let link = self.handle.link();
        match step {
            Step::DeleteLink { name, .. } => {
                let index = match self.index(name).await {
                    Ok(index) => index,
                    Err(ExecError::NoSuchLink(_)) => return Ok(Outcome::AlreadyDone),
                    Err(e) => return Err(e),
                };
                self.forget(name);
                match link.del(index).execute().await {
                    Ok(()) => Ok(Outcome::Done),
                    Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(Outcome::AlreadyDone),
                    Err(source) => Err(nl("deleting link")(source)),
                }
            }
            Step::CreateLink {
                name,
                link: new,
                mtu,
                mac,
            } => {
                let mut message = match new {
                    NewLink::Bond {
                        mode,
                        lacp_rate,
                        options,
                    } => {
                        let mut builder = LinkBond::new(name).mode(nl_bond_mode(*mode));
                        if let Some(rate) = lacp_rate {
                            builder = builder.ad_lacp_rate(nl_lacp_rate(*rate));
                        }
                        for info in bond_infos(options, &HashMap::new()) {
                            builder = builder.append_info_data(info);
                        }
                        builder.build()
                    }
                    NewLink::Vlan { parent, id } => {
                        let parent = self.index(parent).await?;
                        LinkVlan::new(name, parent, *id).build()
                    }
                    NewLink::Bridge {
                        stp,
                        vlan_filtering,
                    } => {
                        // Not LinkBridge::new(): that one creates the bridge up, and links
                        // are brought up by their own step once configured.
                        let mut builder = LinkMessageBuilder::<LinkBridge>::new(name);
                        if let Some(stp) = stp {
                            builder = builder.stp_state(stp_state(*stp));
                        }
                        if let Some(vf) = vlan_filtering {
                            builder = builder.vlan_filtering(*vf);
                        }
                        builder.build()
                    }
                };
                if let Some(mtu) = mtu {
                    message.attributes.push(LinkAttribute::Mtu(*mtu));
                }
                if let Some(mac) = mac {
                    message
                        .attributes
                        .push(LinkAttribute::Address(mac.0.to_vec()));
                }
                link.add(message)
                    .execute()
                    .await
                    .map_err(nl("creating link"))?;
                self.forget(name);
                Ok(Outcome::Created(self.index(name).await?))
            }
            Step::SetMtu { name, to, .. } => {
                let index = self.index(name).await?;
                let message = LinkUnspec::new_with_index(index).mtu(*to).build();
                link.set(message)
                    .execute()
                    .await
                    .map_err(nl("setting MTU"))?;
                Ok(Outcome::Done)
            }
            Step::SetZone { name, to, .. } => {
                let index = self.index(name).await?;
                let message = LinkUnspec::new_with_index(index)
                    .link_group(to.group())
                    .build();
                link.set(message)
                    .execute()
                    .await
                    .map_err(nl("setting the interface group (firewall zone)"))?;
                Ok(Outcome::Done)
            }
            Step::SetForwarding { name, to, .. } => {
                let index = self.index(name).await?;
                let message = LinkUnspec::new_with_index(index)
                    .append_extra_attribute(ipv4_forwarding(*to))
                    .build();
                link.set(message)
                    .execute()
                    .await
                    .map_err(nl("setting IPv4 forwarding"))?;
                Ok(Outcome::Done)
            }
            Step::SetMac { name, to, .. } => {
                let index = self.index(name).await?;
                let message = LinkUnspec::new_with_index(index)
                    .address(to.0.to_vec())
                    .build();
                link.set(message)
                    .execute()
                    .await
                    .map_err(nl("setting MAC address"))?;
                Ok(Outcome::Done)
            }
            Step::SetBondOptions { name, options } => {
                let index = self.index(name).await?;
                let mut member_indexes = HashMap::new();
                if let Some(primary) = &options.primary {
                    member_indexes.insert(primary.clone(), self.index(primary).await?);
                }
                let mut builder =
                    LinkMessageBuilder::<LinkBond>::new_with_info_kind(InfoKind::Bond).index(index);
                for info in bond_infos(options, &member_indexes) {
                    builder = builder.append_info_data(info);
                }
                link.change(builder.build())
                    .execute()
                    .await
                    .map_err(nl("changing bond options"))?;
                Ok(Outcome::Done)
            }
            Step::SetBridgeOptions {
                name,
                stp,
                vlan_filtering,
            } => {
                let index = self.index(name).await?;
                let mut builder =
                    LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
                        .index(index);
                if let Some(stp) = stp {
                    builder = builder.stp_state(stp_state(*stp));
                }
                if let Some(vf) = vlan_filtering {
                    builder = builder.vlan_filtering(*vf);
                }
                link.change(builder.build())
                    .execute()
                    .await
                    .map_err(nl("changing bridge options"))?;
                Ok(Outcome::Done)
            }
            Step::Enslave {
                name,
                master,
                master_is_bond,
                ..
            } => {
                let index = self.index(name).await?;
                let master_index = self.index(master).await?;
                if *master_is_bond {
                    // The bonding driver refuses members that are up.
                    let down = LinkUnspec::new_with_index(index).down().build();
                    link.set(down)
                        .execute()
                        .await
                        .map_err(nl("taking member down before enslaving"))?;
                }
                let message = LinkUnspec::new_with_index(index)
                    .controller(master_index)
                    .build();
                link.set(message).execute().await.map_err(nl("enslaving"))?;
                Ok(Outcome::Done)
            }
            Step::Release { name, .. } => {
                let index = self.index(name).await?;
                let message = LinkUnspec::new_with_index(index).nocontroller().build();
                link.set(message).execute().await.map_err(nl("releasing"))?;
                Ok(Outcome::Done)
            }
            Step::SetPortVlans {
                port, remove, add, ..
            } => {
                let index = self.index(port).await?;
                if !remove.is_empty() {
                    let entries: Vec<PortVlanEntry> = remove
                        .iter()
                        .map(|vid| PortVlanEntry {
                            vid: *vid,
                            pvid: false,
                            untagged: false,
                        })
                        .collect();
                    let message = port_vlan_message(index, &entries);
                    link.del_with_message(message)
                        .execute()
                        .await
                        .map_err(nl("removing bridge port VLANs"))?;
                }
                if !add.is_empty() {
                    let message = port_vlan_message(index, add);
                    link.set(message)
                        .execute()
                        .await
                        .map_err(nl("adding bridge port VLANs"))?;
                }
                Ok(Outcome::Done)
            }
            Step::SetState { name, up } => {
                let index = self.index(name).await?;
                let builder = LinkUnspec::new_with_index(index);
                let message = if *up { builder.up() } else { builder.down() }.build();
                link.set(message)
                    .execute()
                    .await
                    .map_err(nl("setting link state"))?;
                Ok(Outcome::Done)
            }
            Step::AddAddress {
                link: name,
                address,
            } => {
                let index = self.index(name).await?;
                match self
                    .handle
                    .address()
                    .add(index, address.addr(), address.prefix_len())
                    .execute()
                    .await
                {
                    Ok(()) => Ok(Outcome::Done),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(Outcome::AlreadyDone),
                    Err(source) => Err(nl("adding address")(source)),
                }
            }
            Step::DelAddress {
                link: name,
                address,
            } => {
                let index = self.index(name).await?;
                let message = match address.addr() {
                    IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                        .index(index)
                        .address(v4, address.prefix_len())
                        .build(),
                    IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                        .index(index)
                        .address(v6, address.prefix_len())
                        .build(),
                };
                match self.handle.address().del(message).execute().await {
                    Ok(()) => Ok(Outcome::Done),
                    Err(e)
                        if matches!(errno(&e), Some(libc::EADDRNOTAVAIL) | Some(libc::ENOENT)) =>
                    {
                        Ok(Outcome::AlreadyDone)
                    }
                    Err(source) => Err(nl("removing address")(source)),
                }
            }
            Step::AddRoute {
                link: name,
                route,
                onlink,
            } => {
                let index = self.index(name).await?;
                let mut builder = route_builder(route, index)?;
                if route.via.is_none() && route.to.is_ipv4() {
                    builder = builder.scope(RouteScope::Link);
                }
                if *onlink {
                    builder = builder.onlink();
                }
                match self.handle.route().add(builder.build()).execute().await {
                    Ok(()) => Ok(Outcome::Done),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(Outcome::AlreadyDone),
                    Err(source) => Err(nl("adding route")(source)),
                }
            }
            Step::DelRoute { link: name, route } => {
                let index = self.index(name).await?;
                let mut message = route_builder(route, index)?.build();
                // Match whatever protocol/scope/type it was added with (ip route uses "boot").
                message.header.protocol = RouteProtocol::Unspec;
                message.header.scope = RouteScope::NoWhere;
                message.header.kind = RouteType::Unspec;
                match self.handle.route().del(message).execute().await {
                    Ok(()) => Ok(Outcome::Done),
                    Err(e) if matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => {
                        Ok(Outcome::AlreadyDone)
                    }
                    Err(source) => Err(nl("removing route")(source)),
                }
            }
        }
    }
}

fn route_builder(
    route: &ObservedRoute,
    index: u32,
) -> Result<RouteMessageBuilder<IpAddr>, ExecError> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.to.addr(), route.to.prefix_len())
        .map_err(|e| ExecError::Route(e.to_string()))?
        .output_interface(index)
        .priority(route.metric)
        .table_id(route.table);
    if let Some(via) = route.via {
        builder = builder
            .gateway(via)
            .map_err(|e| ExecError::Route(e.to_string()))?;
    }
    Ok(builder)
}

/// A bridge VLAN request; consecutive plain (non-PVID) VLANs with the same flags are sent as
/// ranges so a trunk of thousands of VLANs stays one small message.
fn port_vlan_message(
    index: u32,
    entries: &[PortVlanEntry],
) -> rtnetlink::packet_route::link::LinkMessage {
    let flags_of = |entry: &PortVlanEntry| {
        let mut flags = BridgeVlanInfoFlags::empty();
        if entry.pvid {
            flags |= BridgeVlanInfoFlags::Pvid;
        }
        if entry.untagged {
            flags |= BridgeVlanInfoFlags::Untagged;
        }
        flags
    };
    let mut builder = LinkBridgeVlan::new(index);
    let mut i = 0;
    while i < entries.len() {
        let first = entries[i];
        let mut last = i;
        if !first.pvid {
            while last + 1 < entries.len()
                && !entries[last + 1].pvid
                && entries[last + 1].untagged == first.untagged
                && entries[last + 1].vid == entries[last].vid + 1
            {
                last += 1;
            }
        }
        let flags = flags_of(&first);
        if last == i {
            builder = builder.vlan(first.vid, flags);
        } else {
            builder = builder
                .vlan_range_start(first.vid, flags)
                .vlan_range_end(entries[last].vid, flags);
        }
        i = last + 1;
    }
    builder.build()
}

fn bond_infos(options: &BondOptions, member_indexes: &HashMap<String, u32>) -> Vec<InfoBond> {
    let mut infos = Vec::new();
    if let Some(v) = options.miimon_ms {
        infos.push(InfoBond::MiiMon(v));
    }
    if let Some(v) = options.updelay_ms {
        infos.push(InfoBond::UpDelay(v));
    }
    if let Some(v) = options.downdelay_ms {
        infos.push(InfoBond::DownDelay(v));
    }
    if let Some(v) = options.xmit_hash_policy {
        infos.push(InfoBond::XmitHashPolicy(nl_hash(v)));
    }
    if let Some(v) = options.min_links {
        infos.push(InfoBond::MinLinks(v));
    }
    if let Some(index) = options.primary.as_ref().and_then(|p| member_indexes.get(p)) {
        infos.push(InfoBond::Primary(*index));
    }
    infos
}

fn stp_state(on: bool) -> BridgeStpState {
    if on {
        BridgeStpState::KernelStp
    } else {
        BridgeStpState::Disabled
    }
}

fn nl_bond_mode(mode: BondMode) -> NlMode {
    match mode {
        BondMode::BalanceRr => NlMode::BalanceRr,
        BondMode::ActiveBackup => NlMode::ActiveBackup,
        BondMode::BalanceXor => NlMode::BalanceXor,
        BondMode::Broadcast => NlMode::Broadcast,
        BondMode::Lacp => NlMode::Ieee8023Ad,
        BondMode::BalanceTlb => NlMode::BalanceTlb,
        BondMode::BalanceAlb => NlMode::BalanceAlb,
    }
}

fn nl_lacp_rate(rate: LacpRate) -> BondLacpRate {
    match rate {
        LacpRate::Slow => BondLacpRate::Slow,
        LacpRate::Fast => BondLacpRate::Fast,
    }
}

fn nl_hash(policy: XmitHashPolicy) -> NlHash {
    match policy {
        XmitHashPolicy::Layer2 => NlHash::Layer2,
        XmitHashPolicy::Layer34 => NlHash::Layer34,
        XmitHashPolicy::Layer23 => NlHash::Layer23,
        XmitHashPolicy::Encap23 => NlHash::Encap23,
        XmitHashPolicy::Encap34 => NlHash::Encap34,
        XmitHashPolicy::VlanSrcMac => NlHash::VlanSrcMac,
    }
}
