//! HTTP/1.1 messages from a connection's bytes, with httparse: pure
//! functions, no I/O (what the server and the fuzz target call).
//!
//! [`parse_message`] frames one request; [`handle_bytes`] answers every
//! whole request a buffer holds, in order, as the server does for each
//! connection.

use crate::request::Request;
use crate::response::Response;

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
            // Digits only: no sign, no spaces inside, no list.
            let n = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<usize>().ok())
                .flatten();
            let Some(n) = n else {
                return invalid(format!("invalid Content-Length {value:?}"));
            };
            if length.is_some_and(|l| l != n) {
                return invalid("two different Content-Length headers");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return invalid("chunked bodies are not supported: send a Content-Length");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == 0 {
                    keep_alive = true;
                }
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

/// What [`handle_bytes`] made of a connection's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    /// The answers, in request order, as HTTP bytes ready to send.
    pub output: Vec<u8>,
    /// Input bytes used up: the whole requests answered, or all of the
    /// input once `close` is set. What is left is the start of a request.
    pub consumed: usize,
    /// No more requests on this connection: close it once `output` is
    /// sent (the client asked, or its bytes cannot be framed).
    pub close: bool,
    /// Requests answered.
    pub requests: u64,
    /// Of those, the ones refused before reaching the handler.
    pub refused: u64,
}

/// Answers every whole request at the start of `buf`, in order: each is
/// framed ([`parse_message`], bodies up to `max_body`), routed and checked
/// ([`Request::parse`]); a valid one goes to `handler`, an invalid one gets
/// its 400 without reaching it. Stops at an incomplete request, or after a
/// request that ends the connection. Never panics.
pub fn handle_bytes(
    buf: &[u8],
    max_body: usize,
    handler: &mut dyn FnMut(Request) -> Response,
) -> Exchange {
    let mut ex = Exchange::default();
    while !ex.close && ex.consumed < buf.len() {
        let rest = buf.get(ex.consumed..).unwrap_or_default();
        match parse_message(rest, max_body) {
            Parsed::Incomplete => break,
            // Whatever follows bytes that cannot be framed cannot be
            // trusted either.
            Parsed::Invalid {
                status, message, ..
            } => {
                ex.requests += 1;
                ex.refused += 1;
                ex.output
                    .extend(Response::fault(status, &message).to_http_bytes(false));
                ex.close = true;
                ex.consumed = buf.len();
            }
            Parsed::Complete {
                method,
                path,
                body,
                keep_alive,
                consumed,
            } => {
                ex.requests += 1;
                let response = match Request::parse(&method, &path, &body) {
                    Ok(request) => handler(request),
                    Err(e) => {
                        ex.refused += 1;
                        Response::fault(e.status(), &e.to_string())
                    }
                };
                ex.output.extend(response.to_http_bytes(keep_alive));
                ex.consumed = ex.consumed.saturating_add(consumed.max(1)).min(buf.len());
                if !keep_alive {
                    ex.close = true;
                    ex.consumed = buf.len();
                }
            }
        }
    }
    ex
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
            Parsed::Invalid { status: 400, close: true, message } if message.contains("chunked bodies are not supported")
        ));
        for bad in [
            &b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            b"PUT / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"PUT / HTTP/2.0\r\n\r\n",
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
        let c = parse_message(
            b"GET / HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n",
            MAX,
        );
        assert!(matches!(
            c,
            Parsed::Complete {
                keep_alive: false,
                ..
            }
        ));
    }

    #[test]
    fn http_same_content_length_twice_and_expect_are_accepted() {
        let buf = b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\nExpect: 100-continue\r\n\r\n{}";
        assert!(matches!(
            parse_message(buf, MAX),
            Parsed::Complete { consumed, .. } if consumed == buf.len()
        ));
    }

    fn statuses(output: &[u8]) -> Vec<u16> {
        String::from_utf8_lossy(output)
            .split("HTTP/1.1 ")
            .skip(1)
            .filter_map(|r| r.get(..3)?.parse().ok())
            .collect()
    }

    #[test]
    fn http_handle_bytes_answers_pipelined_requests_in_order() {
        let mut seen = Vec::new();
        let buf = b"GET / HTTP/1.1\r\n\r\nGET /nothing HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\nGET /vm/con";
        let ex = handle_bytes(buf, MAX, &mut |r| {
            seen.push(r);
            Response::no_content()
        });
        assert_eq!(seen, [Request::GetInstanceInfo, Request::GetVersion]);
        assert_eq!(statuses(&ex.output), [204, 400, 204]);
        assert_eq!((ex.requests, ex.refused, ex.close), (3, 1, false));
        assert_eq!(&buf[ex.consumed..], b"GET /vm/con");
    }

    #[test]
    fn http_handle_bytes_stops_at_close_and_at_bad_framing() {
        let mut calls = 0;
        let mut handler = |_| {
            calls += 1;
            Response::no_content()
        };
        let buf = b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let ex = handle_bytes(buf, MAX, &mut handler);
        assert_eq!((ex.requests, ex.close, ex.consumed), (1, true, buf.len()));
        let buf = b"GET / HTTP/1.1\r\n\r\nPUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let ex = handle_bytes(buf, MAX, &mut handler);
        assert_eq!(statuses(&ex.output), [204, 400]);
        assert!(ex.close);
        assert!(String::from_utf8_lossy(&ex.output).ends_with(
            "Connection: close\r\n\r\n{\"fault_message\":\"request body is 99999 bytes, the limit is 51200\"}"
        ));
        assert_eq!(handle_bytes(b"", MAX, &mut handler), Exchange::default());
        assert_eq!(calls, 2);
    }
}
