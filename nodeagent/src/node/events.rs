//! What the node tells the outside world: the node publishes [`NodeEvent`]s, and a transport
//! (today [`crate::bus`], which turns them into D-Bus objects, signals and
//! PropertiesChanged) consumes them. The node never calls the transport, as systemd-machined
//! keeps `machine.c` apart from `machine-dbus.c`; so `node` does not depend on `bus`.
//!
//! Each event is delivered with an acknowledgement the node waits for: a call that changes a
//! VM returns only after its change was announced (a client that got the reply to Start has
//! also been sent the PropertiesChanged to `running`), and a new VM's object is served before
//! CreateVm returns its path. One consumer handles the events in order, so announcements of
//! one VM never overtake each other. Without a consumer (no transport attached) publishing
//! returns at once.
//!
//! Later additions (jobs: JobNew/JobRemoved and progress; drain state; audit records) are
//! further variants; a second consumer (an audit log) would get its own stream.

use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::{mpsc, oneshot};

use super::jobs::{Job, JobResult};
use super::{Node, Vm, VmProperty};

/// Something about the node that its clients may want to know.
#[derive(Clone)]
pub enum NodeEvent {
    /// A VM joined the table (created or loaded at recovery): serve its object. A failure
    /// makes CreateVm undo the creation.
    VmAdded(Arc<Vm>),
    /// A VM made by CreateVm is complete: announce it (`VmNew`).
    VmAnnounced(Arc<Vm>),
    /// A VM was deleted: withdraw its object and announce that (`VmRemoved`).
    VmRemoved(Arc<Vm>),
    /// Properties of a VM changed; their new values are read from the VM.
    VmChanged(Arc<Vm>, Vec<VmProperty>),
    /// The node's `NetworkState` changed.
    NetworkStateChanged,
    /// The node's `Drained` changed.
    DrainedChanged,
    /// A job began: serve its object before the caller gets its path.
    JobNew(Arc<Job>),
    /// A job's `State` changed (from waiting to running).
    JobChanged(Arc<Job>),
    /// A job ended with a result and an error message (empty when done): withdraw its object
    /// and announce `JobRemoved`.
    JobRemoved(Arc<Job>, JobResult, String),
}

impl std::fmt::Debug for NodeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeEvent::VmAdded(vm) => write!(f, "VmAdded({})", vm.name),
            NodeEvent::VmAnnounced(vm) => write!(f, "VmAnnounced({})", vm.name),
            NodeEvent::VmRemoved(vm) => write!(f, "VmRemoved({})", vm.name),
            NodeEvent::VmChanged(vm, props) => write!(f, "VmChanged({}, {props:?})", vm.name),
            NodeEvent::NetworkStateChanged => write!(f, "NetworkStateChanged"),
            NodeEvent::DrainedChanged => write!(f, "DrainedChanged"),
            NodeEvent::JobNew(job) => write!(f, "JobNew({})", job.id),
            NodeEvent::JobChanged(job) => write!(f, "JobChanged({})", job.id),
            NodeEvent::JobRemoved(job, result, _) => {
                write!(f, "JobRemoved({}, {})", job.id, result.as_str())
            }
        }
    }
}

/// The consumer's answer to one event: `Err` with a reason if it could not be carried out.
pub type Outcome = Result<(), String>;

struct Delivery {
    event: NodeEvent,
    done: oneshot::Sender<Outcome>,
}

/// Acknowledges one event; dropping it acknowledges success.
pub struct Ack(Option<oneshot::Sender<Outcome>>);

impl Ack {
    pub fn done(mut self, outcome: Outcome) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ok(()));
        }
    }
}

/// The node's events, in the order they happened, for one consumer.
pub struct EventStream(mpsc::UnboundedReceiver<Delivery>);

impl EventStream {
    /// The next event, or None once the node is gone.
    pub async fn next(&mut self) -> Option<(NodeEvent, Ack)> {
        let d = self.0.recv().await?;
        Some((d.event, Ack(Some(d.done))))
    }
}

/// The node's side: where events go (nowhere until a consumer subscribed).
#[derive(Default)]
pub(super) struct Publisher(StdMutex<Option<mpsc::UnboundedSender<Delivery>>>);

impl Publisher {
    fn sender(&self) -> Option<mpsc::UnboundedSender<Delivery>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Node {
    /// The stream of this node's events. There is one consumer: a second call replaces the
    /// first stream (which then ends).
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        EventStream(rx)
    }

    /// Publishes `event` and waits until the consumer handled it.
    pub(super) async fn publish(&self, event: NodeEvent) -> Outcome {
        let Some(tx) = self.events.sender() else {
            return Ok(());
        };
        let (done, handled) = oneshot::channel();
        if tx.send(Delivery { event, done }).is_err() {
            // The consumer is gone: nobody to tell.
            return Ok(());
        }
        handled.await.unwrap_or(Ok(()))
    }
}
