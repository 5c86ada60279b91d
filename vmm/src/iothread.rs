//! I/O threads: a device's queue events served on a thread of its own
//! (`--disk ...,iothread=on`, QEMU's `iothread`), so that its requests
//! never wait behind the event loop's other work (the API, the console,
//! the NICs) and never delay it.
//!
//! Each thread runs its own event-manager loop over one subscriber (the
//! same [`ember_virtio::QueueEvents`] the main loop would run) under the
//! event loop's seccomp filter, and takes commands from the VMM thread:
//! pause (the subscriber leaves the loop; answered once no request is
//! being served, so a paused VM's queues are still), resume, and exit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::Subscriber;
use crate::seccomp;
use crate::Error;

/// How long a pause waits for the thread to finish the queue pass it is in.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Command {
    Pause,
    Resume,
    Exit,
}

/// Reads the wake-up eventfd: the loop returns and the commands are taken.
struct Wake(EventFd);

impl MutEventSubscriber for Wake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("I/O thread: cannot watch its wake-up eventfd: {e:?}");
        }
    }
}

/// The device's subscriber as the thread runs it: counted, so the exit
/// log says how much the thread served.
struct Counted {
    inner: Subscriber,
    served: Arc<AtomicU64>,
}

impl MutEventSubscriber for Counted {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .init(ops);
    }
}

/// One I/O thread and the way to command it.
pub struct IoThread {
    name: String,
    served: Arc<AtomicU64>,
    commands: Sender<Command>,
    wake: EventFd,
    acks: Receiver<()>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl IoThread {
    /// Starts thread `name` (`ember-blk0` for `virtio-blk0` in `ps`)
    /// serving `subscriber`, paused (see
    /// [`IoThread::resume`]). The thread installs `filters`' event-loop
    /// filter before it serves anything.
    pub fn spawn(
        name: &str,
        subscriber: Subscriber,
        filters: Option<&seccomp::Filters>,
    ) -> Result<Self, Error> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::EventFd("I/O thread", e))?;
        let thread_wake = wake
            .try_clone()
            .map_err(|e| Error::EventFd("I/O thread", e))?;
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| Error::EventLoop(format!("{name}: {e:?}")))?;
        manager.add_subscriber(Arc::new(Mutex::new(Wake(thread_wake))));
        let (commands, rx) = channel();
        let (ack_tx, acks) = channel();
        let (ready_tx, ready) = channel();
        let filters = filters.cloned();
        let thread_name = name.to_string();
        let served = Arc::new(AtomicU64::new(0));
        let subscriber: Subscriber = Arc::new(Mutex::new(Counted {
            inner: subscriber,
            served: served.clone(),
        }));
        // `ember-blk0`: within the kernel's 15 characters of a thread name.
        let os_name = format!("ember-{}", name.trim_start_matches("virtio-"));
        let handle = std::thread::Builder::new()
            .name(os_name)
            .spawn(move || {
                if let Some(f) = filters {
                    if let Err(e) = f.install(seccomp::ThreadKind::Vmm, &thread_name) {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                serve(&thread_name, manager, subscriber, &rx, &ack_tx);
            })
            .map_err(|e| Error::Thread(format!("{name}: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = handle.join();
                return Err(Error::Thread(format!("{name}: {why}")));
            }
            Err(_) => {
                let _ = handle.join();
                return Err(Error::Thread(format!("{name}: ended before it started")));
            }
        }
        log::debug!("{name}: I/O thread started");
        Ok(IoThread {
            name: name.to_string(),
            served,
            commands,
            wake,
            acks,
            handle: Some(handle),
        })
    }

    fn command(&self, c: Command, timeout: Duration) -> Result<(), Error> {
        let what = format!("{c:?}");
        self.commands
            .send(c)
            .map_err(|_| Error::Thread(format!("{}: has ended", self.name)))?;
        self.wake
            .write(1)
            .map_err(|e| Error::EventFd("I/O thread wake-up", e))?;
        match self.acks.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(Error::Thread(format!(
                "{}: did not take `{what}` within {timeout:?} (a request it serves has not returned)",
                self.name
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Error::Thread(format!("{}: has ended", self.name)))
            }
        }
    }

    /// Takes the device out of the thread's loop; returns once no request
    /// is being served.
    pub fn pause(&self) -> Result<(), Error> {
        self.command(Command::Pause, PAUSE_TIMEOUT)
    }

    /// Puts the device (back) into the thread's loop.
    pub fn resume(&self) -> Result<(), Error> {
        self.command(Command::Resume, PAUSE_TIMEOUT)
    }

    /// How many events of its device the thread has served.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Ends the thread (it finishes the pass it is in) and waits for it.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(e) = self.command(Command::Exit, PAUSE_TIMEOUT) {
                log::warn!("{e}");
                return;
            }
            if handle.join().is_err() {
                log::error!("I/O thread {}: panicked", self.name);
            }
            log::info!(
                "I/O thread {}: served {} device events",
                self.name,
                self.served()
            );
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread's loop: serve events; between passes, take commands.
fn serve(
    name: &str,
    mut manager: EventManager<Subscriber>,
    subscriber: Subscriber,
    commands: &Receiver<Command>,
    acks: &Sender<()>,
) {
    let mut id: Option<SubscriberId> = None;
    loop {
        if let Err(e) = manager.run_with_timeout(-1) {
            log::error!(
                "I/O thread {name}: its loop failed, the device is no longer served: {e:?}"
            );
            // Keep answering commands so the VMM is not left waiting.
            while let Ok(c) = commands.recv() {
                let _ = acks.send(());
                if matches!(c, Command::Exit) {
                    return;
                }
            }
            return;
        }
        while let Ok(c) = commands.try_recv() {
            match c {
                Command::Pause => {
                    if let Some(i) = id.take() {
                        if let Err(e) = manager.remove_subscriber(i) {
                            log::error!("I/O thread {name}: cannot take the device out: {e:?}");
                        }
                    }
                }
                Command::Resume => {
                    if id.is_none() {
                        id = Some(manager.add_subscriber(subscriber.clone()));
                    }
                }
                Command::Exit => {
                    let _ = acks.send(());
                    return;
                }
            }
            let _ = acks.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicUsize;

    /// Counts the times its eventfd fired.
    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            if events.fd() == self.evt.as_raw_fd() && self.evt.read().is_ok() {
                self.seen.fetch_add(1, Ordering::SeqCst);
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    fn wait_for(seen: &AtomicUsize, n: usize) -> bool {
        for _ in 0..500 {
            if seen.load(Ordering::SeqCst) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn a_paused_thread_serves_nothing_until_resumed_and_stops_on_drop() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let sub: Subscriber = Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        }));
        let mut t = IoThread::spawn("io-test", sub.clone(), None).unwrap();
        // Spawned paused: an event waits.
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 0, "served while paused");
        t.resume().unwrap();
        assert!(wait_for(&seen, 1), "the waiting event after resume");
        evt.write(1).unwrap();
        assert!(wait_for(&seen, 2), "served while running");
        t.pause().unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 2, "served after pause");
        // Pausing or resuming twice is harmless.
        t.pause().unwrap();
        t.resume().unwrap();
        t.resume().unwrap();
        assert!(wait_for(&seen, 3));
        assert_eq!(t.served(), 3, "the thread counts what it served");
        t.stop();
        assert!(t.handle.is_none());
        assert!(t.pause().is_err(), "a stopped thread says so");
        // The subscriber is free again: only this test holds it.
        drop(t);
        assert_eq!(Arc::strong_count(&sub), 1);
    }
}
