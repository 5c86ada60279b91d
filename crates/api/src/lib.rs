//! Firecracker's HTTP API, for a VMM that orchestrators drive as they drive
//! Firecracker (Kata Containers, firecracker-containerd, the Firecracker
//! SDKs, `curl --unix-socket`).
//!
//! - [`model`]: the published spec's schemas as serde types.
//! - [`Request::parse`]: method + path + body to a checked [`Request`]
//!   (or the 400 the spec's clients expect, with a `fault_message`).
//! - [`http::parse_message`]: one HTTP/1.1 request from a connection's
//!   bytes (httparse), with the body limit.
//! - [`Server`]: the socket, served from one thread with epoll; the VMM
//!   passes a handler that turns a [`Request`] into a [`Response`].
//!
//! The crate knows nothing of a VM: what a request does is the handler's.
//!
//! ```
//! use ember_api::{Request, Response, model::ActionType};
//!
//! let r = Request::parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap();
//! assert_eq!(r, Request::Action(ActionType::InstanceStart));
//!
//! let e = Request::parse("PUT", "/machine-config", br#"{"vcpu_count": 0, "mem_size_mib": 64}"#)
//!     .unwrap_err();
//! let answer = Response::fault(e.status(), &e.to_string());
//! assert_eq!(answer.status, 400);
//! ```

pub mod http;
pub mod model;
pub mod request;
pub mod response;
pub mod server;

use std::path::PathBuf;

pub use request::{Request, RequestError};
pub use response::Response;
pub use server::{Server, ServerStats, MAX_BODY};

/// What can go wrong setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process serves on the socket.
    #[error("{} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The socket cannot be made.
    #[error("cannot create the API socket {}", .path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// epoll failed.
    #[error("epoll")]
    Epoll(#[source] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What the `api_request` fuzz target runs: bytes as they arrive on a
/// connection, parsed request by request, each body checked and, when
/// valid, serialised back. Any input is fine; a panic is a bug.
pub fn fuzz_request(data: &[u8]) {
    let mut rest = data;
    for _ in 0..64 {
        match http::parse_message(rest, MAX_BODY) {
            http::Parsed::Complete {
                method,
                path,
                body,
                consumed,
                ..
            } => {
                assert!(consumed > 0 && consumed <= rest.len());
                if let Ok(request) = Request::parse(&method, &path, &body) {
                    check_round_trip(&request);
                } else {
                    let e = Request::parse(&method, &path, &body).unwrap_err();
                    let r = Response::fault(e.status(), &e.to_string());
                    assert!(!r.to_http_bytes(true).is_empty());
                }
                rest = &rest[consumed..];
            }
            http::Parsed::Invalid {
                status, message, ..
            } => {
                let _ = Response::fault(status, &message).to_http_bytes(false);
                return;
            }
            http::Parsed::Incomplete => return,
        }
    }
}

/// A parsed body serialises and parses back to itself.
fn check_round_trip(request: &Request) {
    fn again<T>(v: &T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(v).expect("a parsed body serialises");
        let back: T = serde_json::from_str(&text).expect("a serialised body parses");
        assert_eq!(&back, v, "round trip of {text}");
    }
    match request {
        Request::PutMachineConfig(m) => again(m),
        Request::PatchMachineConfig(m) => again(m),
        Request::PutBootSource(b) => again(b),
        Request::PutDrive(d) => again(d),
        Request::PatchDrive(d) => again(d),
        Request::PutNetworkInterface(n) => again(n),
        Request::PatchNetworkInterface(n) => again(n),
        Request::PutLogger(l) => again(l),
        Request::PutMetrics(m) => again(m),
        _ => {}
    }
}
