//! Firecracker's HTTP API, for a VMM that orchestrators drive as they drive
//! Firecracker (Kata Containers, firecracker-containerd, the Firecracker
//! SDKs, `curl --unix-socket`).
//!
//! - [`model`]: the published spec's schemas as serde types.
//! - [`Request::parse`]: method + path + body to a checked [`Request`]
//!   (or the 400 the spec's clients expect, with a `fault_message`).
//! - [`http::parse_message`]: one HTTP/1.1 request from a connection's
//!   bytes (httparse), with the body limit; [`handle_bytes`]: every whole
//!   request in a buffer answered in order, as the server does.
//! - [`Server`]: the socket, served from one thread with epoll; the VMM
//!   passes a handler that turns a [`Request`] into a [`Response`].
//!   [`Limits`] bound what a client may hold.
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
//!
//! // Bytes as a client sends them, answered as the server answers them.
//! let version = ember_api::model::FirecrackerVersion { firecracker_version: "1.0.0".into() };
//! let ex = ember_api::handle_bytes(b"GET /version HTTP/1.1\r\n\r\n", ember_api::MAX_BODY, &mut |r| {
//!     assert_eq!(r, Request::GetVersion);
//!     Response::json(200, &version)
//! });
//! assert!(ex.output.starts_with(b"HTTP/1.1 200 OK\r\n"));
//! assert!(ex.output.ends_with(br#"{"firecracker_version":"1.0.0"}"#));
//! ```

#![deny(unsafe_code)]

pub mod balloon;
pub mod http;
pub mod model;
pub mod request;
pub mod response;
pub mod server;
#[allow(unsafe_code)]
mod sys;

use std::path::PathBuf;

pub use http::{handle_bytes, Exchange};
pub use request::{Request, RequestError};
pub use response::Response;
pub use server::{Limits, Server, ServerStats, MAX_BODY};

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
/// connection, answered as the server answers them ([`handle_bytes`]:
/// framing, the body limit, routing, the spec's types and checks), each
/// valid body serialised back and parsed again, and every answer checked
/// to be well-framed HTTP whose error bodies are the spec's `Error`. Any
/// input is fine; a panic is a bug.
pub fn fuzz_request(data: &[u8]) {
    let mut handled = 0u64;
    let mut handler = |request: Request| {
        handled += 1;
        check_round_trip(&request);
        match request {
            Request::GetMachineConfig => Response::json(
                200,
                &model::MachineConfiguration {
                    vcpu_count: 1,
                    mem_size_mib: 128,
                    smt: false,
                    track_dirty_pages: false,
                    cpu_template: None,
                    huge_pages: None,
                },
            ),
            Request::PatchVm(_) => Response::fault(400, "not running"),
            _ => Response::no_content(),
        }
    };
    let ex = handle_bytes(data, MAX_BODY, &mut handler);
    assert!(ex.consumed <= data.len());
    assert!(ex.refused <= ex.requests);
    let answers = check_answers(&ex.output);
    assert_eq!(answers, ex.requests, "one answer per request");
    assert_eq!(handled + ex.refused, ex.requests);
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

/// Parses `output` back as HTTP responses: each has a status line,
/// `Content-Length` framing its body exactly, and, from 400 on, a body
/// that is the spec's `Error`. Returns how many there are.
fn check_answers(mut output: &[u8]) -> u64 {
    let mut count = 0;
    while !output.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(output) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("an answer that is not HTTP: {other:?}"),
        };
        let status = r.code.expect("a status");
        let length: usize = r
            .headers
            .iter()
            .find(|h| h.name == "Content-Length")
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .expect("Content-Length");
        let body = output.get(head..head + length).expect("the whole body");
        if status >= 400 {
            let e: model::Error = serde_json::from_slice(body).expect("an Error body");
            assert!(!e.fault_message.contains('\n'));
        }
        output = output.get(head + length..).unwrap_or_default();
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_request_runs_clean_on_odd_inputs() {
        for input in [
            &b""[..],
            b"\0\0\0",
            b"GET / HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
            b"PUT /drives/a HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"drive_id\":\"a\",\"is_root_device\":true}",
            b"PUT /balloon HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n\xff",
        ] {
            fuzz_request(input);
        }
    }
}
