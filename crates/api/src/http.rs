//! HTTP/1.1 messages from a connection's bytes, with httparse: pure
//! functions, no I/O (what the server and the fuzz target call).

/// The longest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers a request may have.
pub const MAX_HEADERS: usize = 32;

/// What the bytes at the start of a buffer are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// One whole request, `consumed` bytes long.
    Complete {
        /// The method.
        method: String,
        /// The path, without its query string.
        path: String,
        /// The body.
        body: Vec<u8>,
        /// Whether the connection stays open after the response.
        keep_alive: bool,
        /// The request's length in the buffer.
        consumed: usize,
    },
    /// Not a request ember serves: answer `status` with `message`; close
    /// the connection if `close`.
    Invalid {
        /// The HTTP status.
        status: u16,
        /// The fault message.
        message: String,
        /// Whether the rest of the stream cannot be trusted.
        close: bool,
    },
}

fn invalid(message: impl Into<String>) -> Parsed {
    Parsed::Invalid {
        status: 400,
        message: message.into(),
        close: true,
    }
}

/// Parses the request at the start of `buf`; a body longer than
/// `max_body` is refused without waiting for it.
pub fn parse_message(buf: &[u8], max_body: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return invalid(format!("the request head is over {MAX_HEAD} bytes"));
            }
            return Parsed::Incomplete;
        }
        Err(httparse::Error::TooManyHeaders) => {
            return invalid(format!("more than {MAX_HEADERS} headers"))
        }
        Err(e) => return invalid(format!("malformed HTTP request: {e}")),
    };
    if head_len > MAX_HEAD {
        return invalid(format!("the request head is over {MAX_HEAD} bytes"));
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("");
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Ok(n) = value.parse::<usize>() else {
                return invalid(format!("invalid Content-Length {value:?}"));
            };
            if length.is_some_and(|l| l != n) {
                return invalid("two different Content-Length headers");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return invalid("chunked bodies are not supported: send a Content-Length");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    if !path.starts_with('/') {
        return invalid(format!("invalid request target {target:?}"));
    }
    let length = length.unwrap_or(0);
    if length > max_body {
        return invalid(format!(
            "request body is {length} bytes, the limit is {max_body}"
        ));
    }
    let Some(end) = head_len.checked_add(length) else {
        return invalid("request too large");
    };
    if buf.len() < end {
        return Parsed::Incomplete;
    }
    Parsed::Complete {
        method,
        path,
        body: buf[head_len..end].to_vec(),
        keep_alive,
        consumed: end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 51200;

    #[test]
    fn http_incomplete_head_and_body_wait_for_more() {
        assert_eq!(
            parse_message(b"GET / HTTP/1.1\r\nHost:", MAX),
            Parsed::Incomplete
        );
        assert_eq!(
            parse_message(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", MAX),
            Parsed::Incomplete
        );
    }

    #[test]
    fn http_two_pipelined_requests_parse_one_after_the_other() {
        let buf = b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /b?x=1 HTTP/1.1\r\n\r\n";
        let Parsed::Complete {
            method,
            path,
            body,
            consumed,
            keep_alive,
        } = parse_message(buf, MAX)
        else {
            panic!("first");
        };
        assert_eq!(
            (method.as_str(), path.as_str(), body.as_slice()),
            ("PUT", "/a", &b"{}"[..])
        );
        assert!(keep_alive);
        let Parsed::Complete { path, .. } = parse_message(&buf[consumed..], MAX) else {
            panic!("second");
        };
        assert_eq!(path, "/b");
    }

    #[test]
    fn http_limits_and_unsupported_framing_are_refused() {
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX + 1);
        assert!(
            matches!(parse_message(big.as_bytes(), MAX), Parsed::Invalid { status: 400, close: true, message } if message.contains("51200"))
        );
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            parse_message(chunked, MAX),
            Parsed::Invalid { .. }
        ));
        for bad in [
            &b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET\x00 / HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_message(bad, MAX), Parsed::Invalid { .. }),
                "{bad:?}"
            );
        }
        let long = vec![b'a'; MAX_HEAD + 10];
        assert!(matches!(parse_message(&long, MAX), Parsed::Invalid { .. }));
    }

    #[test]
    fn http_connection_close_and_http_1_0_end_the_connection() {
        let c = parse_message(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", MAX);
        assert!(matches!(
            c,
            Parsed::Complete {
                keep_alive: false,
                ..
            }
        ));
        let c = parse_message(b"GET / HTTP/1.0\r\n\r\n", MAX);
        assert!(matches!(
            c,
            Parsed::Complete {
                keep_alive: false,
                ..
            }
        ));
        let c = parse_message(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", MAX);
        assert!(matches!(
            c,
            Parsed::Complete {
                keep_alive: true,
                ..
            }
        ));
    }
}
