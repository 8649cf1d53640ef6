//! thvc node agent: the node daemon `thvc-nodeagent` on the system D-Bus and its client
//! `thvcctl`. See README.md for the architecture and the D-Bus API.

pub mod acl;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod client;
pub mod cloudinit;
pub mod console;
pub mod disks;
pub mod fsutil;
pub mod host;
pub mod hostinfo;
pub mod images;
pub mod layout;
pub mod metrics;
pub mod migration;
pub mod names;
pub mod network;
pub mod node;
pub mod procinfo;
pub mod runner;
pub mod seed;
pub mod spec;
pub mod vm_uuid;
pub mod vmm_api;
pub mod vmm_user;
