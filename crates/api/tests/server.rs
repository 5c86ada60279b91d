//! The server over a real Unix socket: keep-alive, pipelining, limits,
//! stalled clients, stale and live sockets, and many requests.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ember_api::model::InstanceInfo;
use ember_api::{Error, Request, Response, Server};
use vmm_sys_util::eventfd::EventFd;

struct Running {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Vec<Request>>>,
    dir: PathBuf,
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-api-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(tag: &str) -> Running {
    let dir = temp_dir(tag);
    let path = dir.join("api.sock");
    let mut server = Server::bind(&path).unwrap();
    let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let stop2 = stop.try_clone().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let thread = std::thread::spawn(move || {
        let mut handler = |r: Request| {
            seen2.lock().unwrap().push(r.clone());
            match r {
                Request::GetInstanceInfo => Response::json(
                    200,
                    &InstanceInfo {
                        app_name: "t".into(),
                        id: "i".into(),
                        state: "Not started".into(),
                        vmm_version: "0".into(),
                    },
                ),
                _ => Response::no_content(),
            }
        };
        server.run(&mut handler, &stop2).unwrap();
    });
    Running {
        path,
        stop,
        thread: Some(thread),
        seen,
        dir,
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.write(1).unwrap();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        assert!(
            !self.path.exists(),
            "the socket is removed when the server goes"
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(r: &Running) -> UnixStream {
    let s = UnixStream::connect(&r.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one response: status and body.
fn read_response(s: &mut UnixStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return Some((status, body));
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

#[test]
fn server_keep_alive_and_pipelining_answer_in_order() {
    let r = start("keepalive");
    let mode = std::fs::metadata(&r.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut s = connect(&r);
    let mut buf = Vec::new();
    s.write_all(GET).unwrap();
    assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 200);
    // Two requests in one write, the second with a body.
    s.write_all(b"GET /version HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Paused\"}\n")
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 204);
    assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 204);
    let seen = r.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1], Request::GetVersion);
}

#[test]
fn server_invalid_requests_get_400_without_reaching_the_handler() {
    let r = start("invalid");
    let mut s = connect(&r);
    let mut buf = Vec::new();
    s.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let (status, body) = read_response(&mut s, &mut buf).unwrap();
    assert_eq!(status, 400);
    assert!(
        body.contains("fault_message") && body.contains("missing field"),
        "{body}"
    );
    // The connection stays usable after a bad body.
    s.write_all(GET).unwrap();
    assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 200);
    assert_eq!(r.seen.lock().unwrap().len(), 1);
    // A body over the limit: 400 and the connection closes.
    s.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 60000\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut s, &mut buf).unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("51200"), "{body}");
    assert!(read_response(&mut s, &mut buf).is_none(), "closed");
}

#[test]
fn server_stalled_client_does_not_block_others() {
    let r = start("stall");
    let body = br#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    let mut stalled = connect(&r);
    let head = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.write_all(&body[..4]).unwrap();
    let mut idle = connect(&r);
    idle.write_all(b"GET / HT").unwrap();
    let mut other = connect(&r);
    let mut buf = Vec::new();
    for _ in 0..10 {
        other.write_all(GET).unwrap();
        assert_eq!(read_response(&mut other, &mut buf).unwrap().0, 200);
    }
    // The stalled one finishes later and is answered too.
    stalled.write_all(&body[4..]).unwrap();
    let mut b2 = Vec::new();
    assert_eq!(read_response(&mut stalled, &mut b2).unwrap().0, 204);
}

#[test]
fn server_answers_a_thousand_requests_on_one_connection() {
    let r = start("thousand");
    let mut s = connect(&r);
    let mut buf = Vec::new();
    for _ in 0..1000 {
        s.write_all(GET).unwrap();
        assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 200);
    }
    assert_eq!(r.seen.lock().unwrap().len(), 1000);
}

#[test]
fn server_connection_close_and_many_connections() {
    let r = start("close");
    let mut s = connect(&r);
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 200);
    assert!(read_response(&mut s, &mut buf).is_none());
    // More connections than allowed: the extra one is told and closed.
    let held: Vec<UnixStream> = (0..ember_api::server::MAX_CONNECTIONS)
        .map(|_| connect(&r))
        .collect();
    let mut extra = connect(&r);
    let mut b = Vec::new();
    let (status, body) = read_response(&mut extra, &mut b).unwrap();
    assert_eq!(status, 503, "{body}");
    drop(held);
}

#[test]
fn server_bind_replaces_a_stale_socket_and_refuses_a_live_one() {
    let dir = temp_dir("bind");
    let path = dir.join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = Server::bind(&path).unwrap();
    assert!(matches!(Server::bind(&path), Err(Error::InUse(_))));
    drop(live);
    assert!(!path.exists());
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(Server::bind(&path), Err(Error::NotASocket(_))));
    assert!(path.exists(), "a file that is not a socket is left alone");
    let _ = std::fs::remove_dir_all(&dir);
}
