//! A minimal HTTP/1.1 client over a Unix socket for the API tests, and a
//! checker of response bodies against Firecracker's published spec
//! (`../shared/firecracker-api/firecracker.json`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// The body as JSON (Null if empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The `fault_message` of an error body, or "".
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A keep-alive connection to the API socket.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects, retrying for up to `timeout` while the socket appears.
    pub fn connect(path: &Path, timeout: Duration) -> Client {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .expect("read timeout");
                    return Client {
                        stream,
                        buf: Vec::new(),
                    };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends one request and reads its response.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.send_raw(req.as_bytes());
        self.read_reply().expect("a response")
    }

    /// Reads one response; None if the server closed the connection first.
    pub fn read_reply(&mut self) -> Option<Reply> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body =
                        String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).to_string();
                    self.buf.drain(..end + 4 + len);
                    return Some(Reply {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the server has closed this connection (reads EOF within
    /// `timeout`).
    pub fn closed_by_server(&mut self, timeout: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Firecracker's spec, as JSON.
pub struct Spec(Value);

/// Where the spec is: `../shared/firecracker-api/` beside the workspace.
pub fn spec_path() -> PathBuf {
    crate::workspace_root().join("../shared/firecracker-api/firecracker.json")
}

impl Spec {
    /// Loads the spec.
    pub fn load() -> Spec {
        let path = spec_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Spec(serde_json::from_str(&text).expect("the spec is JSON"))
    }

    /// Checks `reply` against the spec's response for `method` `path`
    /// (`path` as in the spec, e.g. `/drives/{drive_id}`): the status is
    /// one the spec lists (or `default`), and the body matches its schema.
    pub fn check(&self, method: &str, path: &str, reply: &Reply) {
        let op = &self.0["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "the spec has no {method} {path}");
        let code = reply.status.to_string();
        let resp = if op["responses"][&code].is_object() {
            &op["responses"][&code]
        } else {
            &op["responses"]["default"]
        };
        assert!(
            resp.is_object(),
            "{method} {path}: status {code} is not in the spec"
        );
        match resp.get("schema") {
            Some(schema) => {
                let body: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| {
                    panic!("{method} {path}: body is not JSON ({e}): {}", reply.body)
                });
                if let Err(e) = self.matches(schema, &body, "body") {
                    panic!("{method} {path} {code}: {e}\nbody: {}", reply.body);
                }
            }
            None => assert!(
                reply.body.is_empty(),
                "{method} {path} {code}: the spec has no body, got {}",
                reply.body
            ),
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/definitions/");
                &self.0["definitions"][name]
            }
            None => schema,
        }
    }

    /// Whether `v` matches `schema` (types, required fields, enums, no
    /// properties the schema does not have).
    pub fn matches(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            if !options.contains(v) {
                return Err(format!("{at} = {v} is not one of {options:?}"));
            }
        }
        let ty = schema.get("type").and_then(Value::as_str).unwrap_or(
            if schema.get("properties").is_some() {
                "object"
            } else {
                ""
            },
        );
        match ty {
            "object" => {
                let obj = v.as_object().ok_or(format!("{at} is not an object"))?;
                let props = schema.get("properties").and_then(Value::as_object);
                for req in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let key = req.as_str().unwrap_or("");
                    if !obj.contains_key(key) {
                        return Err(format!("{at}.{key} is required"));
                    }
                }
                if let Some(props) = props {
                    for (k, val) in obj {
                        let sub = props
                            .get(k)
                            .ok_or(format!("{at}.{k} is not in the schema"))?;
                        self.matches(sub, val, &format!("{at}.{k}"))?;
                    }
                }
                Ok(())
            }
            "array" => {
                let arr = v.as_array().ok_or(format!("{at} is not an array"))?;
                for (i, item) in arr.iter().enumerate() {
                    self.matches(&schema["items"], item, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            "string" if !v.is_string() => Err(format!("{at} is not a string")),
            "boolean" if !v.is_boolean() => Err(format!("{at} is not a boolean")),
            "integer" if !(v.is_u64() || v.is_i64()) => Err(format!("{at} is not an integer")),
            _ => Ok(()),
        }
    }
}

/// A client that checks every reply against the spec.
pub struct Api {
    /// The connection (for requests the spec does not describe).
    pub client: Client,
    spec: Spec,
}

impl Api {
    /// Connects to `sock` (waiting up to 20 s for it to appear).
    pub fn connect(sock: &Path) -> Api {
        Api {
            client: Client::connect(sock, Duration::from_secs(20)),
            spec: Spec::load(),
        }
    }

    /// Sends a request, checks the reply against the spec and its status.
    pub fn call(&mut self, method: &str, path: &str, body: Option<&str>, want: u16) -> Reply {
        let r = self.client.request(method, path, body);
        self.spec.check(method, spec_route(path), &r);
        assert_eq!(r.status, want, "{method} {path} {body:?}: {r:?}");
        if want >= 400 {
            let fault = r.fault();
            assert!(
                !fault.is_empty(),
                "{method} {path}: no fault_message: {r:?}"
            );
            assert!(!fault.contains('\n'), "one line: {fault}");
            assert!(!fault.contains("panicked"), "{fault}");
        }
        r
    }

    /// `GET /` every 10 ms for `dur`: the round trips, in ms, or the
    /// first reply that was not a 200.
    pub fn probe_root(&mut self, dur: Duration) -> Result<Vec<f64>, String> {
        let end = Instant::now() + dur;
        let mut v = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            self.client.send_raw(b"GET / HTTP/1.1\r\n\r\n");
            match self.client.read_reply() {
                Some(r) if r.status == 200 => {}
                other => return Err(format!("GET / answered {other:?}")),
            }
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(v)
    }

    /// Pauses the VM and takes a snapshot of `kind` ("Full" or "Diff")
    /// into `state` and `mem`, both answered 204.
    pub fn pause_and_snapshot(&mut self, state: &Path, mem: &Path, kind: &str) {
        self.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
        let body = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "{kind}"}}"#,
            state.display(),
            mem.display()
        );
        self.call("PUT", "/snapshot/create", Some(&body), 204);
    }

    /// `GET /`'s state.
    pub fn state(&mut self) -> String {
        self.call("GET", "/", None, 200).json()["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// The spec's name for a path (`/drives/root` is `/drives/{drive_id}`).
pub fn spec_route(path: &str) -> &str {
    if path.starts_with("/drives/") {
        "/drives/{drive_id}"
    } else if path.starts_with("/network-interfaces/") {
        "/network-interfaces/{iface_id}"
    } else {
        path
    }
}

/// Asserts that every round trip in `v` (ms, from [`Api::probe_root`]) was
/// under `budget_ms`; prints p50, p99 and the maximum under `what`.
pub fn check_latency(what: &str, mut v: Vec<f64>, budget_ms: f64) {
    assert!(!v.is_empty(), "{what}: no API calls were timed");
    v.sort_by(f64::total_cmp);
    let p50 = v[v.len() / 2];
    let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
    let max = v[v.len() - 1];
    eprintln!(
        "{what}: GET / p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({} calls)",
        v.len()
    );
    assert!(
        max < budget_ms,
        "{what}: the API took {max:.1} ms (budget {budget_ms} ms)"
    );
}
