//! A response: a status and an optional JSON body, and its HTTP bytes.

use serde::Serialize;

use crate::model;

/// One response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<Vec<u8>>,
}

/// The reason phrase of the statuses the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

impl Response {
    /// 204, no body.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// `status` with `value` as its JSON body.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                body: Some(body),
            },
            Err(e) => Response::fault(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// An error: `{"fault_message": message}` (the spec's `Error`).
    pub fn fault(status: u16, message: &str) -> Self {
        Response::json(
            status,
            &model::Error {
                fault_message: message.to_string(),
            },
        )
    }

    /// The response on the wire; `keep_alive` false adds `Connection: close`.
    pub fn to_http_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let body = self.body.as_deref().unwrap_or(&[]);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: Ember\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            body.len()
        );
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_fault_body_matches_the_error_schema() {
        let r = Response::fault(400, "bad \"thing\"");
        let v: serde_json::Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1);
        assert_eq!(obj["fault_message"], "bad \"thing\"");
    }

    #[test]
    fn response_http_bytes_have_length_type_and_connection() {
        let text = String::from_utf8(Response::fault(400, "x").to_http_bytes(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"x\"}"));
        let text = String::from_utf8(Response::no_content().to_http_bytes(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: Ember\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
