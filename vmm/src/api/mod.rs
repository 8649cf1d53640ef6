//! The control API: a Unix socket speaking line-delimited JSON ([`protocol`]), served by its
//! own thread ([`server`]), acting on the VM through [`vm::VmApi`].

pub mod protocol;
pub mod server;
pub mod vm;

pub use protocol::Request;
pub use server::{
    bind, deferred, send_with_files, spawn, Answerer, ApiError, ApiHandler, ApiListener, Reply,
};
pub use vm::{VmApi, VmSummary};
