//! The API thread: Firecracker's HTTP API ([`ember_api::Server`]) on a Unix
//! socket, on a thread of its own under its own seccomp filter. Each
//! request goes to the VMM thread through a channel and an eventfd that
//! wakes its event loop, and the reply comes back on a channel of its
//! own: a client never blocks disk or network I/O, and the VMM thread
//! never waits for a client.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use ember_api::{Request, Response, Server};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{Filters, ThreadKind};
use crate::Error;

/// One request and where its reply goes.
#[derive(Debug)]
pub struct ApiCall {
    /// The parsed, checked request.
    pub request: Request,
    /// The reply channel the API thread waits on.
    pub reply: Sender<Response>,
}

/// The VMM thread's end: requests, and the eventfd that says there are
/// some.
#[derive(Debug)]
pub struct ApiChannel {
    /// Requests in arrival order.
    pub requests: Receiver<ApiCall>,
    /// Written once per request; watched by the event loop.
    pub wake: EventFd,
}

/// The running API thread.
#[derive(Debug)]
pub struct ApiThread {
    handle: Option<JoinHandle<()>>,
    stop: EventFd,
}

fn evt(what: &'static str) -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd(what, e))
}

impl ApiThread {
    /// Starts serving `server` on a new thread, which installs the API
    /// filter before it accepts the first connection.
    pub fn spawn(mut server: Server, filters: &Filters) -> Result<(Self, ApiChannel), Error> {
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let wake = evt("API wake-up")?;
        let wake_api = wake
            .try_clone()
            .map_err(|e| Error::EventFd("API wake-up", e))?;
        let stop = evt("API stop")?;
        let stop_api = stop
            .try_clone()
            .map_err(|e| Error::EventFd("API stop", e))?;
        let filters = filters.clone();
        let handle = std::thread::Builder::new()
            .name("ember-api".into())
            .spawn(move || {
                if let Err(e) = filters.install(ThreadKind::Api, "api") {
                    log::error!("api: {}", crate::error_chain(&e));
                    return;
                }
                let mut handler = |request: Request| -> Response {
                    let (reply, answer) = mpsc::channel();
                    if tx.send(ApiCall { request, reply }).is_err() || wake_api.write(1).is_err() {
                        return Response::fault(500, "the VMM thread is gone");
                    }
                    answer
                        .recv()
                        .unwrap_or_else(|_| Response::fault(500, "the VMM thread is gone"))
                };
                if let Err(e) = server.run(&mut handler, &stop_api) {
                    log::error!("api: the server stopped: {}", crate::error_chain(&e));
                }
            })
            .map_err(Error::SpawnApi)?;
        Ok((
            ApiThread {
                handle: Some(handle),
                stop,
            },
            ApiChannel { requests: rx, wake },
        ))
    }

    /// Stops serving and waits for the thread, which removes the socket.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(e) = self.stop.write(1) {
                log::warn!("api: cannot ask the server to stop: {e}");
                return;
            }
            if handle.join().is_err() {
                log::error!("api: the thread panicked");
            }
        }
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        self.stop_now();
    }
}
