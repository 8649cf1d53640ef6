//! The control API: a Unix socket speaking line-delimited JSON ([`protocol`]), served by its
//! own thread ([`server`]), acting on the VM through [`vm::VmApi`].

pub mod protocol;
pub mod server;
pub mod vm;

pub use protocol::Request;
pub use server::{bind, send_with_files, spawn, ApiError, ApiHandler, ApiListener};
pub use vm::{VmApi, VmSummary};
