//! gRPC by hand over one raw HTTP/2 connection (the `h2` crate): for tests that send what no
//! well-behaved client would (truncated frames, bad flags, bytes that are not protobuf) or that
//! look at HTTP/2 itself (the server's concurrent-stream limit).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

/// One HTTP/2 connection to the coordinator. The connection task ends when this is dropped.
pub struct RawConn {
    /// Opens streams.
    pub send: SendRequest<Bytes>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS as last seen by the connection task.
    max_streams: watch::Receiver<usize>,
    /// Drives the connection.
    task: JoinHandle<()>,
    /// Sent as `authorization: Bearer ...` on every call, when set.
    pub token: Option<String>,
}

/// What came back on one stream.
#[derive(Debug)]
pub struct RawResponse {
    /// The HTTP status.
    pub http: http::StatusCode,
    /// `grpc-status` (from the trailers, or the headers of a trailers-only answer).
    pub code: Option<Code>,
    /// `grpc-message`, percent-decoded.
    pub message: String,
    /// The data frames, concatenated.
    pub data: Vec<u8>,
}

/// A gRPC length-prefixed message: `flag`, the 4-byte big-endian `len`, then `body`.
pub fn frame_with(flag: u8, len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(flag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A well-formed uncompressed frame around `body`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    frame_with(0, body.len() as u32, body)
}

fn status_of(headers: &http::HeaderMap) -> (Option<Code>, String) {
    match tonic::Status::from_header_map(headers) {
        Some(s) => (Some(s.code()), s.message().to_string()),
        None => (None, String::new()),
    }
}

impl RawConn {
    /// Connects and completes the HTTP/2 handshake.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let (send, mut conn) = h2::client::handshake(tcp)
            .await
            .unwrap_or_else(|e| panic!("HTTP/2 handshake with {addr}: {e}"));
        let (tx, max_streams) = watch::channel(conn.max_concurrent_send_streams());
        let task = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| {
                let polled = std::pin::Pin::new(&mut conn).poll(cx);
                tx.send_if_modified(|m| {
                    let now = conn.max_concurrent_send_streams();
                    std::mem::replace(m, now) != now
                });
                polled
            })
            .await;
        });
        RawConn {
            send,
            max_streams,
            task,
            token: None,
        }
    }

    /// Waits (bounded) until the server's concurrent-stream limit is `expected`, and returns it.
    pub async fn wait_max_streams(&mut self, expected: usize, bound: Duration) -> usize {
        let seen = tokio::time::timeout(bound, self.max_streams.wait_for(|m| *m == expected))
            .await
            .ok()
            .and_then(|r| r.ok().map(|m| *m));
        match seen {
            Some(m) => m,
            None => panic!(
                "the server's max concurrent streams is {}, expected {expected}",
                *self.max_streams.borrow()
            ),
        }
    }

    /// Opens a gRPC call to `path` (`/pkg.Service/Method`) and sends `body` (raw bytes, sent as
    /// given), ending the request stream if `end`.
    pub async fn start(
        &mut self,
        path: &str,
        body: Vec<u8>,
        end: bool,
    ) -> (ResponseFuture, SendStream<Bytes>) {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://rota{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("a valid request head");
        let mut send = self.send.clone().ready().await.expect("connection ready");
        let (response, mut stream) = send
            .send_request(request, false)
            .unwrap_or_else(|e| panic!("send_request {path}: {e}"));
        // A server may answer (say UNAUTHENTICATED, trailers-only) and close the stream before
        // the connection task gets to the body: then the stream is already inactive here, and
        // the answer waits in `response`, which is what the caller reads and checks.
        if let Err(e) = stream.send_data(Bytes::from(body), end) {
            eprintln!("send_data {path}: {e} (the server already closed the stream)");
        }
        (response, stream)
    }

    /// Makes a call with `body` as the whole request and reads the whole answer (bounded).
    pub async fn call(&mut self, path: &str, body: Vec<u8>, bound: Duration) -> RawResponse {
        let (response, _stream) = self.start(path, body, true).await;
        tokio::time::timeout(bound, read_response(response))
            .await
            .unwrap_or_else(|_| panic!("no complete answer to {path} within {bound:?}"))
            .unwrap_or_else(|e| panic!("{path}: HTTP/2 error: {e}"))
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a response to its end: headers, data, trailers.
pub async fn read_response(response: ResponseFuture) -> Result<RawResponse, h2::Error> {
    let response = response.await?;
    let http = response.status();
    let (mut code, mut message) = status_of(response.headers());
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await? {
        let (c, m) = status_of(&trailers);
        if c.is_some() {
            code = c;
            message = m;
        }
    }
    Ok(RawResponse {
        http,
        code,
        message,
        data,
    })
}
