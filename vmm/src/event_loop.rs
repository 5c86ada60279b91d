//! The main thread's epoll loop (event-manager): console input, and the
//! events that end the VM (i8042 reset, ACPI power-off, a vCPU ending,
//! SIGINT/SIGTERM).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use ember_vcpu::VcpuEnd;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::console::SocketConsole;
use crate::devices::Serial;
use crate::iothread::IoThread;
use crate::seccomp::Filters;
use crate::signals::StopSignals;
use crate::vcpus::VcpuExitReport;
use crate::Error;

/// Why the loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest reset through the i8042.
    I8042Reset,
    /// The guest powered off through ACPI (sleep state S5).
    AcpiPowerOff,
    /// A vCPU ended (guest reset, power-off, halt, or a KVM failure).
    Vcpu(VcpuEnd),
    /// A stop signal arrived.
    Signal(libc::c_int),
    /// The guest was migrated away.
    Migrated,
    /// A migration left the guest unable to go on here (a post-copy that
    /// lost its source).
    MigrationFailed(String),
}

/// An event-loop subscriber as the loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Feeds console input to the UART, only as fast as the guest drains it.
struct ConsoleInput {
    input: Option<File>,
    serial: Arc<Mutex<Serial>>,
    drained: EventFd,
    paused: bool,
    /// A socket console: its clients come and go, each one the input.
    socket: Option<SocketConsole>,
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
                if let Some(socket) = &self.socket {
                    socket.disconnect();
                }
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("console: cannot read input, ignoring it from now on: {e}");
                let _ = ops.remove(Events::new(input, EventSet::IN));
                self.input = None;
                if let Some(socket) = &self.socket {
                    socket.disconnect();
                }
            }
        }
    }

    /// A client connected to the socket console: it becomes the input.
    fn accept(&mut self, ops: &mut EventOps) {
        let Some(client) = self.socket.as_ref().and_then(SocketConsole::accept) else {
            return;
        };
        if let Some(old) = self.input.take() {
            let _ = ops.remove(Events::new(&old, EventSet::IN));
        }
        // While the FIFO is full the drained event adds it.
        if !self.paused {
            if let Err(e) = ops.add(Events::new(&client, EventSet::IN)) {
                log::warn!("console: cannot watch the client's input: {e:?}");
            }
        }
        self.input = Some(client);
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
        if self.socket.as_ref().map(|s| s.listener().as_raw_fd()) == Some(events.fd()) {
            self.accept(ops);
            return;
        }
        if self.input.as_ref().map(|i| i.as_raw_fd()) == Some(events.fd()) {
            self.forward(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Also when put back after a pause: input is watched again.
        self.paused = false;
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("console: cannot watch the UART: {e:?}");
        }
        if let Some(socket) = &self.socket {
            if let Err(e) = ops.add(Events::new(socket.listener(), EventSet::IN)) {
                log::error!("console: cannot watch the console socket: {e:?}");
            }
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
    fds: Vec<std::os::fd::RawFd>,
    reset: Option<EventFd>,
    power_off: Option<EventFd>,
    vcpu: Option<(EventFd, Arc<VcpuExitReport>)>,
    signals: Option<StopSignals>,
    api: Option<EventFd>,
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
        if let Some(reset) = self.reset.as_ref().filter(|e| e.as_raw_fd() == fd) {
            let _ = reset.read();
            self.record(Stop::I8042Reset);
        } else if let Some(off) = self.power_off.as_ref().filter(|e| e.as_raw_fd() == fd) {
            let _ = off.read();
            self.record(Stop::AcpiPowerOff);
        } else if let Some((evt, report)) = self.vcpu.as_ref().filter(|v| v.0.as_raw_fd() == fd) {
            let _ = evt.read();
            if let Some(end) = report.take() {
                self.record(Stop::Vcpu(end));
            }
        } else if let Some(signals) = self.signals.as_mut().filter(|s| s.as_raw_fd() == fd) {
            match signals.read() {
                Some(libc::SIGHUP) => {
                    log::info!("SIGHUP: reopening the log file");
                    crate::logger::reopen();
                }
                Some(sig) => self.record(Stop::Signal(sig)),
                None => {}
            }
        } else if let Some(api) = self.api.as_ref().filter(|e| e.as_raw_fd() == fd) {
            // The requests themselves are taken by the loop's owner.
            let _ = api.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for &fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        }
    }
}

/// A subscriber's handle in the loop, to take it out again.
pub type SubscriberId = event_manager::SubscriberId;

/// The event loop of the VMM thread: the events that end the VM, the API's
/// wake-up, and (once a VM is built) its console and devices.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: Arc<Mutex<Option<Stop>>>,
    /// The stop signals' signalfd (owned by the loop's watcher).
    signal_fd: std::os::fd::RawFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

/// What a built VM adds to the event loop.
pub struct VmInputs {
    /// Console input (stdin), if any.
    pub console_in: Option<File>,
    /// A socket console's listener, if the console is one.
    pub console_socket: Option<SocketConsole>,
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// The UART's "receive FIFO drained" event.
    pub serial_drained: EventFd,
    /// The i8042 reset event.
    pub reset: EventFd,
    /// The ACPI power-off event.
    pub power_off: EventFd,
    /// The vCPU exit event.
    pub vcpu_evt: EventFd,
    /// Where the vCPUs report why they ended.
    pub report: Arc<VcpuExitReport>,
    /// Device subscribers (virtio queues).
    pub devices: Vec<Subscriber>,
    /// Device subscribers served on I/O threads of their own, with the
    /// threads' names.
    pub io_threads: Vec<(String, Subscriber)>,
}

/// The parts of a VM's inputs that stop while it is paused: console
/// input and device queues (they touch guest memory and inject
/// interrupts), as subscribers to take out of the loop and put back, and
/// the I/O threads, paused and resumed with them.
pub struct Pausable {
    subscribers: Vec<Subscriber>,
    ids: Vec<SubscriberId>,
    io_threads: Vec<IoThread>,
}

impl Pausable {
    /// Ends the I/O threads (at exit: nothing is served afterwards).
    pub fn stop_io_threads(&mut self) {
        for t in &mut self.io_threads {
            t.stop();
        }
    }
}

impl std::fmt::Debug for Pausable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pausable")
            .field("subscribers", &self.subscribers.len())
            .field("attached", &!self.ids.is_empty())
            .field("io_threads", &self.io_threads.len())
            .finish()
    }
}

fn loop_error(e: event_manager::Error) -> Error {
    Error::EventLoop(format!("{e:?}"))
}

impl EventLoop {
    /// The stop signals' descriptor (readable when one is pending).
    pub fn signal_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.signal_fd)
    }

    /// A loop watching the stop signals and, if given, the API's wake-up
    /// eventfd (its requests are then taken with [`EventLoop::run_once`]'s
    /// caller).
    pub fn new(signals: StopSignals, api: Option<EventFd>) -> Result<Self, Error> {
        let mut manager = EventManager::<Subscriber>::new().map_err(loop_error)?;
        let stop = Arc::new(Mutex::new(None));
        let signal_fd = signals.as_raw_fd();
        let mut fds = vec![signal_fd];
        fds.extend(api.as_ref().map(|e| e.as_raw_fd()));
        manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
            fds,
            reset: None,
            power_off: None,
            vcpu: None,
            signals: Some(signals),
            api,
            stop: stop.clone(),
        })));
        Ok(EventLoop {
            manager,
            stop,
            signal_fd,
        })
    }

    /// Adds a built VM's events: the ones that end it stay for good; the
    /// console input and devices come back as a [`Pausable`] that is
    /// attached (see [`EventLoop::resume`]). The devices that want one get
    /// an I/O thread, under `filters`' event-loop filter.
    pub fn add_vm(
        &mut self,
        inputs: VmInputs,
        filters: Option<&Filters>,
    ) -> Result<Pausable, Error> {
        // The threads first: a failure leaves the loop as it was.
        let io_threads = inputs
            .io_threads
            .into_iter()
            .map(|(name, s)| IoThread::spawn(&name, s, filters))
            .collect::<Result<Vec<_>, Error>>()?;
        let fds = vec![
            inputs.reset.as_raw_fd(),
            inputs.power_off.as_raw_fd(),
            inputs.vcpu_evt.as_raw_fd(),
        ];
        self.manager
            .add_subscriber(Arc::new(Mutex::new(StopWatcher {
                fds,
                reset: Some(inputs.reset),
                power_off: Some(inputs.power_off),
                vcpu: Some((inputs.vcpu_evt, inputs.report)),
                signals: None,
                api: None,
                stop: self.stop.clone(),
            })));
        let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(ConsoleInput {
            input: inputs.console_in,
            socket: inputs.console_socket,
            serial: inputs.serial,
            drained: inputs.serial_drained,
            paused: false,
        }))];
        subscribers.extend(inputs.devices);
        let mut p = Pausable {
            subscribers,
            ids: Vec::new(),
            io_threads,
        };
        self.resume(&mut p);
        Ok(p)
    }

    /// Takes the console input and devices out of the loop: none of their
    /// events is served until [`EventLoop::resume`].
    pub fn pause(&mut self, p: &mut Pausable) -> Result<(), Error> {
        // Every one is taken out, even after a failure (a subscriber the
        // loop does not know is out already), so resume puts each back once.
        let mut result = Ok(());
        for id in p.ids.drain(..) {
            if let Err(e) = self.manager.remove_subscriber(id) {
                result = Err(loop_error(e));
            }
        }
        for t in &p.io_threads {
            if let Err(e) = t.pause() {
                result = Err(e);
            }
        }
        result
    }

    /// Puts the console input and devices (back) into the loop.
    pub fn resume(&mut self, p: &mut Pausable) {
        if p.ids.is_empty() {
            for s in &p.subscribers {
                p.ids.push(self.manager.add_subscriber(s.clone()));
            }
        }
        for t in &p.io_threads {
            if let Err(e) = t.resume() {
                log::error!("{e}");
            }
        }
    }

    /// Waits for events (at most `timeout_ms`, -1 for no limit) and
    /// serves them.
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<(), Error> {
        self.manager
            .run_with_timeout(timeout_ms)
            .map_err(loop_error)?;
        Ok(())
    }

    /// Ends the loop with `s` (unless something ended it first).
    pub fn stop_with(&self, s: Stop) {
        let mut slot = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(s);
        }
    }

    /// The first reason to stop, if any (taken).
    pub fn take_stop(&mut self) -> Option<Stop> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Runs until something ends the VM, and says what.
    pub fn run(&mut self) -> Result<Stop, Error> {
        loop {
            if let Some(s) = self.take_stop() {
                return Ok(s);
            }
            self.run_once(-1)?;
        }
    }
}
