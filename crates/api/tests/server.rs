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
use ember_api::{Error, Limits, Request, Response, Server};
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
    start_with(tag, Limits::default())
}

fn start_with(tag: &str, limits: Limits) -> Running {
    let dir = temp_dir(tag);
    let path = dir.join("api.sock");
    let mut server = Server::bind(&path).unwrap();
    server.set_limits(limits);
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

/// Whether the server closes `s` (after any answers) within 10 s.
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Short timeouts, for tests.
fn quick(max_connections: usize, close_idle: bool) -> Limits {
    Limits {
        max_connections,
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        close_idle,
    }
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
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the replacement is 0600 too");
    assert!(UnixStream::connect(&path).is_ok(), "and it listens");
    assert!(matches!(Server::bind(&path), Err(Error::InUse(_))));
    drop(live);
    assert!(!path.exists());
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(Server::bind(&path), Err(Error::NotASocket(_))));
    assert!(path.exists(), "a file that is not a socket is left alone");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_half_sent_request_is_closed_after_the_request_timeout() {
    let r = start_with("halfsent", quick(8, false));
    let mut half = connect(&r);
    half.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vc")
        .unwrap();
    let mut idle = connect(&r);
    let t = std::time::Instant::now();
    assert!(closed_by_server(&mut half));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // An idle connection is kept while there is room.
    std::thread::sleep(Duration::from_millis(500));
    let mut buf = Vec::new();
    idle.write_all(GET).unwrap();
    assert_eq!(read_response(&mut idle, &mut buf).unwrap().0, 200);
    assert!(r
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|q| *q == Request::GetInstanceInfo));
}

#[test]
fn server_idle_connection_is_closed_when_told_to() {
    let r = start_with("idle", quick(8, true));
    let mut idle = connect(&r);
    let mut buf = Vec::new();
    idle.write_all(GET).unwrap();
    assert_eq!(read_response(&mut idle, &mut buf).unwrap().0, 200);
    assert!(closed_by_server(&mut idle));
}

#[test]
fn server_full_table_makes_room_by_closing_the_longest_idle() {
    // Idle for a second counts: the 503 below must come well before that.
    let r = start_with(
        "evict",
        Limits {
            idle_timeout: Duration::from_secs(1),
            ..quick(2, false)
        },
    );
    let mut first = connect(&r);
    let mut buf = Vec::new();
    first.write_all(GET).unwrap();
    assert_eq!(read_response(&mut first, &mut buf).unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(100));
    let mut second = connect(&r);
    second.write_all(GET).unwrap();
    assert_eq!(read_response(&mut second, &mut Vec::new()).unwrap().0, 200);
    // Both are in use: a third is told so.
    let mut third = connect(&r);
    let (status, body) = read_response(&mut third, &mut Vec::new()).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    // Once idle long enough, the oldest makes room.
    std::thread::sleep(Duration::from_millis(1200));
    let mut fourth = connect(&r);
    fourth.write_all(GET).unwrap();
    assert_eq!(read_response(&mut fourth, &mut Vec::new()).unwrap().0, 200);
    assert!(closed_by_server(&mut first));
    second.write_all(GET).unwrap();
    assert_eq!(read_response(&mut second, &mut Vec::new()).unwrap().0, 200);
}

#[test]
fn server_client_that_does_not_read_its_answers_is_closed() {
    let r = start_with("noread", quick(8, false));
    let mut greedy = connect(&r);
    greedy
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Far more answers than the socket buffers hold; the writes stall once
    // the server stops reading.
    let many = GET.repeat(20_000);
    let _ = greedy.write_all(&many);
    std::thread::sleep(Duration::from_millis(800));
    assert!(closed_by_server(&mut greedy));
    // Others are still served.
    let mut other = connect(&r);
    other.write_all(GET).unwrap();
    assert_eq!(read_response(&mut other, &mut Vec::new()).unwrap().0, 200);
}

#[test]
fn server_client_that_shuts_its_side_still_gets_its_answers() {
    let r = start("halfclose");
    let mut s = connect(&r);
    s.write_all(&GET.repeat(3)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        assert_eq!(read_response(&mut s, &mut buf).unwrap().0, 200);
    }
    assert!(closed_by_server(&mut s));
}

#[test]
fn server_run_can_be_called_again_after_a_stop() {
    let dir = temp_dir("rerun");
    let path = dir.join("api.sock");
    let mut server = Server::bind(&path).unwrap();
    let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    stop.write(1).unwrap();
    let mut handler = |_| Response::no_content();
    server.run(&mut handler, &stop).unwrap();
    server.run(&mut handler, &stop).unwrap();
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_bind_refuses_a_path_too_long_for_a_socket() {
    let dir = temp_dir("long");
    let path = dir.join("s".repeat(120));
    let e = Server::bind(&path).unwrap_err();
    assert!(matches!(e, Error::Socket { .. }), "{e}");
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
