//! Message-size refusals in the coordinator's words.
//!
//! tonic refuses a request message larger than the server's limit before any
//! handler runs, with `OUT_OF_RANGE` and "decoded message length too large:
//! found N bytes, the limit is: M bytes". gRPC's own rule is
//! `RESOURCE_EXHAUSTED`, and an operator needs the setting's name, so
//! [`MessageSizeLayer`] rewrites such a response's status (it comes as a
//! trailers-only response, the status in its headers). [`refusal`] does the
//! same for a message refused in the middle of a stream.

use std::task::{Context, Poll};

use futures::future::MapOk;
use futures::TryFutureExt;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

/// The setting named in refusals.
pub const SETTING: &str = "--max-message-size";

/// The coordinator's refusal for tonic's "message too large" status, or
/// `None` for any other status.
pub fn refusal(status: &Status) -> Option<Status> {
    const TOO_LARGE: &str = "decoded message length too large";
    if status.code() != Code::OutOfRange || !status.message().contains(TOO_LARGE) {
        return None;
    }
    let number_after = |key: &str| -> Option<u64> {
        let rest = &status.message()[status.message().find(key)? + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let message = match (number_after("found"), number_after("limit is:")) {
        (Some(found), Some(limit)) => {
            format!("message: is {found} bytes; the limit is {limit} bytes ({SETTING})")
        }
        _ => format!("message: {} ({SETTING})", status.message()),
    };
    Some(Status::resource_exhausted(message))
}

/// Rewrites a trailers-only response whose status is tonic's "too large".
fn rewrite<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if let Some(ours) = refusal(&status) {
        let headers = response.headers_mut();
        headers.remove("grpc-status");
        headers.remove("grpc-message");
        headers.remove("grpc-status-details-bin");
        if ours.add_header(headers).is_err() {
            // Our message is plain ASCII; this cannot fail, but if it did the
            // original status is still the better answer than none.
            let _ = status.add_header(headers);
        }
    }
    response
}

/// The layer that applies `rewrite` to every response.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageSizeLayer;

impl<S> Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;

    fn layer(&self, inner: S) -> MessageSize<S> {
        MessageSize { inner }
    }
}

/// The service [`MessageSizeLayer`] wraps around the server's routes.
#[derive(Clone, Debug)]
pub struct MessageSize<S> {
    /// The routes.
    inner: S,
}

type Rewrite<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, Req, B> Service<Req> for MessageSize<S>
where
    S: Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Rewrite<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req).map_ok(rewrite::<B> as Rewrite<B>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_too_large_becomes_resource_exhausted_naming_the_setting() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        let ours = refusal(&tonic_says).expect("rewritten");
        assert_eq!(ours.code(), Code::ResourceExhausted);
        assert_eq!(
            ours.message(),
            "message: is 5000000 bytes; the limit is 4194304 bytes (--max-message-size)"
        );
        assert!(refusal(&Status::out_of_range("something else")).is_none());
        assert!(refusal(&Status::internal("decoded message length too large")).is_none());
    }

    #[test]
    fn only_a_too_large_status_in_the_headers_is_rewritten() {
        let mut response = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        )
        .into_http::<()>();
        response = rewrite(response);
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("the limit is 8 bytes"));

        let untouched = rewrite(Status::not_found("no job").into_http::<()>());
        let status = Status::from_header_map(untouched.headers()).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        let plain = rewrite(http::Response::new(()));
        assert!(Status::from_header_map(plain.headers()).is_none());
    }
}
