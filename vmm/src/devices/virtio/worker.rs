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
    /// End the worker thread (the VM is going away).
    Shutdown,
}

/// The transport's line to the worker. Activation is asynchronous (kicks that arrive before the
/// worker picks it up wait in the ioeventfds); reset waits for the worker to let go of the
/// queues, so the driver can reuse their memory.
pub struct WorkerControl {
    event: EventFd,
    pending: Mutex<Vec<Command>>,
    resets_done: Mutex<u64>,
    reset_cond: Condvar,
}

/// How long a reset waits for a worker busy with I/O before giving up on it.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

impl WorkerControl {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(WorkerControl {
            event: EventFd::new(EFD_NONBLOCK)?,
            pending: Mutex::new(Vec::new()),
            resets_done: Mutex::new(0),
            reset_cond: Condvar::new(),
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
        let target = *self.resets_done.lock().unwrap_or_else(|e| e.into_inner()) + 1;
        self.push(Command::Reset);
        let done = self.resets_done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .reset_cond
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

    fn reset_done(&self) {
        *self.resets_done.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.reset_cond.notify_all();
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
    mut handler: Box<dyn QueueHandler>,
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
    for (i, fd) in handler
        .timer_fds()
        .into_iter()
        .take(super::MAX_TIMERS)
        .enumerate()
    {
        add(fd, TOKEN_TIMER - i as u64, EventSet::IN)?;
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
        // The active device's interrupt, for coalescing; None while the device is reset.
        let mut interrupt: Option<Interrupt> = None;
        loop {
            let mut timeout = -1;
            for _ in 0..MAX_ROUNDS_PER_WAKEUP {
                let n = match epoll.wait(timeout, &mut events) {
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
                if let Some(i) = &interrupt {
                    i.begin_batch();
                }
                let flow = handle_events(
                    &events[..n],
                    handler.as_mut(),
                    &queue_events,
                    &control,
                    &mut interrupt,
                );
                if let Flow::Shutdown = flow {
                    return;
                }
                // Anything that became ready meanwhile joins this wakeup's interrupt.
                timeout = 0;
            }
            if let Some(i) = &interrupt {
                i.end_batch();
            }
        }
    })
}

/// Runs the handler for each ready event. Activation starts coalescing on the device's
/// interrupt (from the next wakeup on); reset ends it.
fn handle_events(
    events: &[EpollEvent],
    handler: &mut dyn QueueHandler,
    queue_events: &[EventFd],
    control: &WorkerControl,
    interrupt: &mut Option<Interrupt>,
) -> Flow {
    for event in events {
        match event.data() {
            TOKEN_CONTROL => {
                let _ = control.event.read();
                for cmd in control.take() {
                    match cmd {
                        Command::Activate(activation) => {
                            let device_interrupt = activation.interrupt.clone();
                            handler.activate(activation);
                            // Kicks and input that came before activation were dropped
                            // while inactive: look at everything once now.
                            for index in 0..queue_events.len() {
                                handler.queue_notified(index);
                            }
                            handler.backend_ready();
                            *interrupt = Some(device_interrupt);
                        }
                        Command::Reset => {
                            if let Some(i) = interrupt.take() {
                                i.end_batch();
                            }
                            handler.reset();
                            control.reset_done();
                        }
                        Command::LimitsChanged => {
                            if interrupt.is_some() {
                                handler.timer_fired(None);
                            }
                        }
                        Command::Shutdown => {
                            if let Some(i) = interrupt.take() {
                                i.end_batch();
                            }
                            handler.reset();
                            control.reset_done();
                            return Flow::Shutdown;
                        }
                    }
                }
            }
            TOKEN_BACKEND => {
                if interrupt.is_some() {
                    handler.backend_ready();
                }
            }
            token if token <= TOKEN_TIMER && token > TOKEN_TIMER - super::MAX_TIMERS as u64 => {
                // Also read while inactive: the timer is level-triggered.
                handler.timer_fired(Some((TOKEN_TIMER - token) as usize));
            }
            index => {
                if let Some(evt) = queue_events.get(index as usize) {
                    let _ = evt.read();
                    if interrupt.is_some() {
                        handler.queue_notified(index as usize);
                    }
                }
            }
        }
    }
    Flow::Continue
}
