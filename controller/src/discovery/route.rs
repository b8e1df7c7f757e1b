//! The HTTP/2 route of `Discovery.Subscribe`, with the pushes' encoding in our hands.
//!
//! tonic's generated server encodes a streaming response into one growable buffer per
//! stream and reuses that buffer for the stream's life: after a full-state push of a large
//! mesh (1.5 MB at 10,000 pods) every subscriber keeps a buffer of about 2 MB until it
//! disconnects, 200 MB for 100 nodes that only ever receive pushes of a few kilobytes
//! afterwards. Here each push is encoded into an allocation of its exact size, handed to
//! HTTP/2 and freed once it is written. Everything else is tonic's: the request stream is
//! decoded by its `Streaming`, the service is [`DiscoveryService`]'s `Discovery` impl, and
//! errors become statuses by [`Status::into_http`]. Like the generated server, requests
//! must not be compressed and responses are not.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ambit_proto::discovery::discovery_server::{Discovery, DiscoveryServer};
use ambit_proto::discovery::{Push, SubscribeRequest};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::Message as _;
use tonic::body::Body;
use tonic::codec::{Codec as _, Streaming};
use tonic::server::NamedService;
use tonic::Status;

use super::{DiscoveryService, PushStream};

/// The one method of the service.
const SUBSCRIBE: &str = "/ambit.discovery.v1.Discovery/Subscribe";

/// The `Discovery` service as an HTTP route (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct DiscoveryRoute {
    service: DiscoveryService,
}

impl DiscoveryRoute {
    pub(super) fn new(service: DiscoveryService) -> Self {
        DiscoveryRoute { service }
    }
}

impl NamedService for DiscoveryRoute {
    const NAME: &'static str = <DiscoveryServer<DiscoveryService> as NamedService>::NAME;
}

impl tonic::codegen::Service<http::Request<Body>> for DiscoveryRoute {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.service.clone();
        Box::pin(async move {
            Ok(if request.uri().path() == SUBSCRIBE {
                subscribe(service, request).await
            } else {
                Status::unimplemented(format!("no method {}", request.uri().path())).into_http()
            })
        })
    }
}

async fn subscribe(
    service: DiscoveryService,
    request: http::Request<Body>,
) -> http::Response<Body> {
    let compressed = request
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e != "identity");
    if compressed {
        return Status::unimplemented("compressed requests are not accepted").into_http();
    }
    let mut codec = tonic_prost::ProstCodec::<Push, SubscribeRequest>::default();
    let request = request.map(|body| Streaming::new_request(codec.decoder(), body, None, None));
    match Discovery::subscribe(&service, tonic::Request::from_http(request)).await {
        Err(status) => status.into_http(),
        Ok(response) => {
            let (metadata, pushes, _) = response.into_parts();
            let mut http = http::Response::new(Body::new(StreamBody::new(frames(pushes))));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            http
        }
    }
}

/// The response body: one data frame per push, then the trailers carrying the stream's
/// status (OK when the pushes end, the error when one fails).
fn frames(
    pushes: PushStream,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Status>> + Send + 'static {
    futures::stream::unfold(Some(pushes), |state| async move {
        let mut pushes = state?;
        let (frame, next) = match pushes.next().await {
            Some(Ok(push)) => match encode(&push) {
                Ok(bytes) => (Frame::data(bytes), Some(pushes)),
                Err(status) => (trailers(&status), None),
            },
            Some(Err(status)) => (trailers(&status), None),
            None => (trailers(&Status::ok("")), None),
        };
        Some((Ok(frame), next))
    })
}

/// One gRPC message: the uncompressed flag, the length (big-endian) and the encoded push,
/// in an allocation of exactly that size.
fn encode(push: &Push) -> Result<Bytes, Status> {
    let len = push.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("a push of {len} bytes is too large")))?;
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    push.encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding a push: {e}")))?;
    Ok(Bytes::from(buf))
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be a header value; the code alone still says it.
        headers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    Frame::trailers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_framed_as_one_uncompressed_grpc_message() {
        let push = Push {
            nonce: "1-1".into(),
            full_state: true,
            version: 7,
            ..Push::default()
        };
        let bytes = encode(&push).expect("encodes");
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - 5);
        assert_eq!(Push::decode(&bytes[5..]).expect("decodes"), push);
    }
}
