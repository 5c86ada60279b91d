//! A scripted migration destination for the tests: it speaks ember's
//! migration protocol (crates/migration) up to a chosen phase and then
//! disappears, as a killed or unplugged peer would.

use std::os::unix::net::UnixListener;

use ember_migration::{write_reply, Event, Receiver, Reply};

/// Where a scripted destination disappears (its socket closes, as if it
/// were killed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vanish {
    /// Nothing listens at the address.
    NotListening,
    /// Accepted, then gone before reading anything.
    Connected,
    /// Read the start, gone without an answer.
    AfterStart,
    /// Gone after three batches of memory.
    MidMemory,
    /// Gone at the end of the first pre-copy round, without `Synced`.
    AtSync,
    /// Read the state and the end (the source has paused the guest), gone
    /// without `Received`.
    AfterState,
    /// Read the release (the source let go of the disks), gone without
    /// `Done`: the source takes the disks back and resumes.
    AfterRelease,
    /// Never: the whole stream, then `Done`.
    Never,
}

/// Every phase, in stream order.
pub const VANISH_AT: [Vanish; 7] = [
    Vanish::NotListening,
    Vanish::Connected,
    Vanish::AfterStart,
    Vanish::MidMemory,
    Vanish::AtSync,
    Vanish::AfterState,
    Vanish::AfterRelease,
];

/// A destination that follows the protocol until `at`, then disappears
/// (with [`Vanish::Never`], to the end: it answers `Done` to the release,
/// as if it ran the guest, and reads until the source closes).
pub fn destination(listener: UnixListener, at: Vanish) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        if at == Vanish::Connected {
            return;
        }
        let mut back = conn.try_clone().unwrap();
        let mut r = Receiver::new(conn).unwrap();
        assert!(matches!(r.next(), Ok(Event::Start(_))), "{at:?}: a start");
        if at == Vanish::AfterStart {
            return;
        }
        write_reply(&mut back, &Reply::Ready).unwrap();
        let mut batches = 0;
        loop {
            match r.next() {
                Ok(Event::Pages(_) | Event::ZeroPages(_)) => {
                    batches += 1;
                    if at == Vanish::MidMemory && batches == 3 {
                        return;
                    }
                }
                Ok(Event::Sync) if at == Vanish::AtSync => return,
                Ok(Event::Sync) => write_reply(&mut back, &Reply::Synced).unwrap(),
                Ok(Event::End) if at == Vanish::AfterState => return,
                Ok(Event::End) => write_reply(&mut back, &Reply::Received).unwrap(),
                Ok(Event::Release) if at == Vanish::AfterRelease => return,
                Ok(Event::Release) => {
                    write_reply(&mut back, &Reply::Done).unwrap();
                    // The source ends the stream and closes.
                    while r.next().is_ok() {}
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("{at:?}: the source's stream broke first: {e}"),
            }
        }
    })
}
