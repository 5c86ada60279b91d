//! The main thread's epoll loop (event-manager): console input, and the
//! events that end the VM (i8042 reset, a vCPU ending, SIGINT/SIGTERM).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use ember_vcpu::VcpuEnd;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::Serial;
use crate::signals::StopSignals;
use crate::vcpus::VcpuExitReport;
use crate::Error;

/// Why the loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest reset through the i8042.
    I8042Reset,
    /// A vCPU ended (guest reset, power-off, halt, or a KVM failure).
    Vcpu(VcpuEnd),
    /// A stop signal arrived.
    Signal(libc::c_int),
}

/// An event-loop subscriber as the loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Feeds console input to the UART, only as fast as the guest drains it.
struct ConsoleInput {
    input: Option<File>,
    serial: Arc<Mutex<Serial>>,
    drained: EventFd,
    paused: bool,
}

impl ConsoleInput {
    fn forward(&mut self, ops: &mut EventOps) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            // Wait for the guest to drain the FIFO before reading more.
            if let Err(e) = ops.remove(Events::new(input, EventSet::IN)) {
                log::warn!("console: cannot pause input: {e:?}");
            }
            self.paused = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match input.read(&mut buf[..want]) {
            Ok(0) => {
                log::debug!("console: input closed");
                let _ = ops.remove(Events::new(input, EventSet::IN));
                self.input = None;
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("console: cannot read input, ignoring it from now on: {e}");
                let _ = ops.remove(Events::new(input, EventSet::IN));
                self.input = None;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.paused {
                self.paused = false;
                if let Some(input) = &self.input {
                    if let Err(e) = ops.add(Events::new(input, EventSet::IN)) {
                        log::warn!("console: cannot resume input: {e:?}");
                    }
                }
            }
            return;
        }
        if self.input.as_ref().map(|i| i.as_raw_fd()) == Some(events.fd()) {
            self.forward(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("console: cannot watch the UART: {e:?}");
        }
        if let Some(input) = &self.input {
            // A regular file cannot be polled (EPERM): console input is then ignored.
            if let Err(e) = ops.add(Events::new(input, EventSet::IN)) {
                log::info!("console: input cannot be polled, ignoring it: {e:?}");
                self.input = None;
            }
        }
    }
}

/// Watches the events that end the VM and records the first.
struct StopWatcher {
    reset: EventFd,
    vcpu_evt: EventFd,
    report: Arc<VcpuExitReport>,
    signals: StopSignals,
    stop: Arc<Mutex<Option<Stop>>>,
}

impl StopWatcher {
    fn record(&self, s: Stop) {
        let mut slot = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(s);
        }
    }
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.record(Stop::I8042Reset);
        } else if fd == self.vcpu_evt.as_raw_fd() {
            let _ = self.vcpu_evt.read();
            if let Some(end) = self.report.take() {
                self.record(Stop::Vcpu(end));
            }
        } else if fd == self.signals.as_raw_fd() {
            if let Some(sig) = self.signals.read() {
                self.record(Stop::Signal(sig));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.reset.as_raw_fd(),
            self.vcpu_evt.as_raw_fd(),
            self.signals.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        }
    }
}

/// The event loop of one VM.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: Arc<Mutex<Option<Stop>>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

/// What the event loop watches.
pub struct LoopInputs {
    /// Console input (stdin), if any.
    pub console_in: Option<File>,
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// The UART's "receive FIFO drained" event.
    pub serial_drained: EventFd,
    /// The i8042 reset event.
    pub reset: EventFd,
    /// The vCPU exit event.
    pub vcpu_evt: EventFd,
    /// Where the vCPUs report why they ended.
    pub report: Arc<VcpuExitReport>,
    /// SIGINT/SIGTERM.
    pub signals: StopSignals,
    /// Device subscribers (virtio queues).
    pub devices: Vec<Subscriber>,
}

impl EventLoop {
    /// Builds the loop and registers its subscribers.
    pub fn new(inputs: LoopInputs) -> Result<Self, Error> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        let stop = Arc::new(Mutex::new(None));
        manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            input: inputs.console_in,
            serial: inputs.serial,
            drained: inputs.serial_drained,
            paused: false,
        })));
        manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
            reset: inputs.reset,
            vcpu_evt: inputs.vcpu_evt,
            report: inputs.report,
            signals: inputs.signals,
            stop: stop.clone(),
        })));
        for d in inputs.devices {
            manager.add_subscriber(d);
        }
        Ok(EventLoop { manager, stop })
    }

    /// Runs until something ends the VM, and says what.
    pub fn run(&mut self) -> Result<Stop, Error> {
        loop {
            if let Some(s) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Ok(s);
            }
            self.manager
                .run()
                .map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        }
    }
}
