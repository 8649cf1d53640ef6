//! The worker thread of one virtio device: waits on its queues' ioeventfds, its backend and a
//! control channel from the transport, and runs the device's `QueueHandler`.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use seccompiler::BpfProgram;

use super::{Activation, Interrupt, QueueHandler};
use crate::sandbox::{self, ThreadKind};

pub enum Command {
    Activate(Activation),
    Reset,
    /// The device's rate limits changed: whatever waits for a timer tries again now.
    LimitsChanged,
    /// Stop touching guest memory and the backend until `Resume` (the VM is paused: a
    /// snapshot must see memory and queues standing still).
    Pause,
    Resume,
    /// The guest continues here after a restore or migration (see `QueueHandler::announce`).
    Announce,
    /// End the worker thread (the VM is going away).
    Shutdown,
}

/// The transport's line to the worker. Activation is asynchronous (kicks that arrive before the
/// worker picks it up wait in the ioeventfds); reset waits for the worker to let go of the
/// queues, so the driver can reuse their memory, and pause waits until it stands still.
pub struct WorkerControl {
    event: EventFd,
    pending: Mutex<Vec<Command>>,
    /// Resets and pauses the worker has carried out.
    acks: Mutex<u64>,
    ack_cond: Condvar,
}

/// How long a reset waits for a worker busy with I/O before giving up on it.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

impl WorkerControl {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(WorkerControl {
            event: EventFd::new(EFD_NONBLOCK)?,
            pending: Mutex::new(Vec::new()),
            acks: Mutex::new(0),
            ack_cond: Condvar::new(),
        }))
    }

    /// How many activations wait for the worker (tests of the transport, without a thread).
    #[cfg(test)]
    pub fn pending_activations(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| matches!(c, Command::Activate(_)))
            .count()
    }

    fn push(&self, cmd: Command) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cmd);
        if let Err(e) = self.event.write(1) {
            tracing::error!("cannot wake a virtio worker: {e}");
        }
    }

    pub fn activate(&self, activation: Activation) {
        self.push(Command::Activate(activation));
    }

    /// Resets the device and waits until its worker no longer touches the queues. Returns
    /// false if the worker did not answer in time.
    pub fn reset(&self) -> bool {
        self.push_and_wait(Command::Reset)
    }

    /// Stops the worker between two requests and waits until it has; false if it did not
    /// answer in time. Kicks, input and timers that come meanwhile are served on `resume`.
    pub fn pause(&self) -> bool {
        self.push_and_wait(Command::Pause)
    }

    pub fn resume(&self) {
        self.push(Command::Resume);
    }

    pub fn announce(&self) {
        self.push(Command::Announce);
    }

    fn push_and_wait(&self, cmd: Command) -> bool {
        let target = *self.acks.lock().unwrap_or_else(|e| e.into_inner()) + 1;
        self.push(cmd);
        let done = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .ack_cond
            .wait_timeout_while(done, RESET_TIMEOUT, |n| *n < target)
            .unwrap_or_else(|e| e.into_inner());
        *done >= target
    }

    /// Tells the worker its device's rate limits changed.
    pub fn limits_changed(&self) {
        self.push(Command::LimitsChanged);
    }

    /// Ends the worker thread after the commands already queued.
    pub fn shutdown(&self) {
        self.push(Command::Shutdown);
    }

    fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn ack(&self) {
        *self.acks.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.ack_cond.notify_all();
    }
}

const TOKEN_CONTROL: u64 = u64::MAX;
const TOKEN_BACKEND: u64 = u64::MAX - 1;
/// Rate limit timer `i` of the handler has token `TOKEN_TIMER - i`.
const TOKEN_TIMER: u64 = u64::MAX - 2;

/// How many times one wakeup looks again for events that became ready while it worked,
/// before it raises the interrupt for all of them: more work per guest interrupt under load,
/// a bounded delay for the first completion.
const MAX_ROUNDS_PER_WAKEUP: usize = 4;

/// Where a worker stands after handling some events.
enum Flow {
    Continue,
    Shutdown,
}

/// Starts the worker thread of a device; it installs `filter` (the device worker seccomp
/// filter, None with `--seccomp off`) before anything else.
pub fn spawn(
    name: String,
    handler: Box<dyn QueueHandler>,
    queue_events: Vec<EventFd>,
    control: Arc<WorkerControl>,
    filter: Option<BpfProgram>,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let add = |fd: RawFd, token: u64, events: EventSet| {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    };
    add(control.event.as_raw_fd(), TOKEN_CONTROL, EventSet::IN)?;
    for (i, evt) in queue_events.iter().enumerate() {
        add(evt.as_raw_fd(), i as u64, EventSet::IN)?;
    }
    if let Some(fd) = handler.backend_fd() {
        // Edge-triggered: the handler drains the backend whenever it has guest buffers, and
        // retries when the guest adds buffers, so a backend with data but no buffers to put it
        // in does not spin this thread.
        add(fd, TOKEN_BACKEND, EventSet::IN | EventSet::EDGE_TRIGGERED)?;
    }
    let timers: Vec<RawFd> = handler
        .timer_fds()
        .into_iter()
        .take(super::MAX_TIMERS)
        .collect();
    for (i, fd) in timers.iter().enumerate() {
        add(*fd, TOKEN_TIMER - i as u64, EventSet::IN)?;
    }
    let builder = std::thread::Builder::new()
        .name(name)
        .stack_size(crate::THREAD_STACK_SIZE);
    builder.spawn(move || {
        if let Err(e) = sandbox::seccomp::apply(ThreadKind::DeviceWorker, filter.as_ref()) {
            tracing::error!("virtio worker not started: {e}");
            return;
        }
        sandbox::test_forbidden_syscall(ThreadKind::DeviceWorker);
        let mut events = vec![EpollEvent::default(); queue_events.len() + 2 + super::MAX_TIMERS];
        let mut worker = Worker {
            handler,
            queue_events,
            control,
            interrupt: None,
            paused: false,
            epoll,
            timers,
        };
        loop {
            let mut timeout = -1;
            for _ in 0..MAX_ROUNDS_PER_WAKEUP {
                let n = match worker.epoll.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio worker epoll failed, device stops: {e}");
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                if let Some(i) = &worker.interrupt {
                    i.begin_batch();
                }
                if let Flow::Shutdown = worker.handle_events(&events[..n]) {
                    return;
                }
                // Anything that became ready meanwhile joins this wakeup's interrupt.
                timeout = 0;
            }
            if let Some(i) = &worker.interrupt {
                i.end_batch();
            }
        }
    })
}

enum Watch {
    On,
    Off,
}

/// A worker thread's own state.
struct Worker {
    handler: Box<dyn QueueHandler>,
    queue_events: Vec<EventFd>,
    control: Arc<WorkerControl>,
    /// The active device's interrupt, for coalescing; None while the device is reset.
    interrupt: Option<Interrupt>,
    /// Paused (the VM is): commands only; kicks are read and served on resume.
    paused: bool,
    epoll: Epoll,
    /// The handler's rate limit timers: level-triggered, so out of the epoll set while paused.
    timers: Vec<RawFd>,
}

impl Worker {
    /// Looks at every queue, the backend and the timers once: after activation (kicks and
    /// input that came before were dropped while inactive) and after a pause.
    fn serve_everything(&mut self) {
        for index in 0..self.queue_events.len() {
            self.handler.queue_notified(index);
        }
        self.handler.backend_ready();
        self.handler.timer_fired(None);
    }

    fn watch_timers(&self, watch: Watch) {
        for (i, fd) in self.timers.iter().enumerate() {
            let event = EpollEvent::new(EventSet::IN, TOKEN_TIMER - i as u64);
            let op = match watch {
                Watch::On => ControlOperation::Add,
                Watch::Off => ControlOperation::Delete,
            };
            if let Err(e) = self.epoll.ctl(op, *fd, event) {
                tracing::error!("virtio worker cannot change its timer watch: {e}");
            }
        }
    }

    /// Runs the handler for each ready event. Activation starts coalescing on the device's
    /// interrupt (from the next wakeup on); reset ends it.
    fn handle_events(&mut self, events: &[EpollEvent]) -> Flow {
        for event in events {
            match event.data() {
                TOKEN_CONTROL => {
                    let _ = self.control.event.read();
                    for cmd in self.control.take() {
                        if let Flow::Shutdown = self.command(cmd) {
                            return Flow::Shutdown;
                        }
                    }
                }
                _ if self.paused => {
                    // Only queue kicks can be ready here (timers are unwatched, the backend
                    // is edge-triggered): read, and served on resume.
                    if let Some(evt) = self.queue_events.get(event.data() as usize) {
                        let _ = evt.read();
                    }
                }
                TOKEN_BACKEND => {
                    if self.interrupt.is_some() {
                        self.handler.backend_ready();
                    }
                }
                token if token <= TOKEN_TIMER && token > TOKEN_TIMER - super::MAX_TIMERS as u64 => {
                    // Also read while inactive: the timer is level-triggered.
                    self.handler
                        .timer_fired(Some((TOKEN_TIMER - token) as usize));
                }
                index => {
                    if let Some(evt) = self.queue_events.get(index as usize) {
                        let _ = evt.read();
                        if self.interrupt.is_some() {
                            self.handler.queue_notified(index as usize);
                        }
                    }
                }
            }
        }
        Flow::Continue
    }

    fn command(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Activate(activation) => {
                let device_interrupt = activation.interrupt.clone();
                self.handler.activate(activation);
                self.interrupt = Some(device_interrupt);
                if !self.paused {
                    self.serve_everything();
                }
            }
            Command::Reset => {
                if let Some(i) = self.interrupt.take() {
                    i.end_batch();
                }
                self.handler.reset();
                self.control.ack();
            }
            Command::LimitsChanged => {
                if self.interrupt.is_some() && !self.paused {
                    self.handler.timer_fired(None);
                }
            }
            Command::Pause => {
                if !self.paused {
                    self.paused = true;
                    self.watch_timers(Watch::Off);
                }
                self.control.ack();
            }
            Command::Resume => {
                if self.paused {
                    self.paused = false;
                    self.watch_timers(Watch::On);
                    if self.interrupt.is_some() {
                        self.serve_everything();
                    }
                }
            }
            Command::Announce => self.handler.announce(),
            Command::Shutdown => {
                if let Some(i) = self.interrupt.take() {
                    i.end_batch();
                }
                self.handler.reset();
                self.control.ack();
                return Flow::Shutdown;
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::devices::virtio::testing::{memory, TestRing};

    /// Reports what the worker asked of the device.
    struct Recorder(mpsc::Sender<String>);

    impl QueueHandler for Recorder {
        fn activate(&mut self, _: Activation) {
            let _ = self.0.send("activate".into());
        }
        fn reset(&mut self) {}
        fn queue_notified(&mut self, index: usize) {
            let _ = self.0.send(format!("notify {index}"));
        }
    }

    #[test]
    fn a_paused_worker_serves_nothing_until_resumed_then_everything() {
        let (tx, rx) = mpsc::channel();
        let control = WorkerControl::new().expect("control");
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kicker = kick.try_clone().expect("clone");
        spawn(
            "test".into(),
            Box::new(Recorder(tx)),
            vec![kick],
            control.clone(),
            None,
        )
        .expect("worker");
        let mem = memory();
        let (activation, _irq) = TestRing::new(&mem, 16).activation(Vec::new(), 0);
        control.activate(activation);
        let wait = |what: &str| {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(10)).expect(what),
                what,
                "in order"
            );
        };
        wait("activate");
        wait("notify 0");

        assert!(control.pause(), "paused");
        kicker.write(1).expect("kick");
        // A second pause is a round trip through the worker after the kick: it has seen the
        // kick by the time this returns, and must not have served it.
        assert!(control.pause(), "still paused");
        assert!(rx.try_recv().is_err(), "nothing served while paused");
        control.resume();
        wait("notify 0");
        kicker.write(1).expect("kick");
        wait("notify 0");
        control.shutdown();
    }
}
