//! A small real HTTP/1.1 client (hyper) for tests of the sidecar's HTTP servers: one connection per request, the
//! whole body read, a timeout on everything.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::HeaderMap;
use hyper_util::rt::TokioIo;

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `content-type` header.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Sends one request to `addr` and reads the whole answer, within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&serde_json::Value>,
    timeout: Duration,
) -> crate::Result<Response> {
    let body = json_body.map(|b| Bytes::from(b.to_string()));
    send_within(addr, method, path, body, timeout).await
}

/// Like [`request`], with the JSON body sent exactly as written.
pub async fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_text: &str,
    timeout: Duration,
) -> crate::Result<Response> {
    let body = Some(Bytes::from(json_text.to_string()));
    send_within(addr, method, path, body, timeout).await
}

async fn send_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> crate::Result<Response> {
    tokio::time::timeout(timeout, send(addr, method, path, body))
        .await
        .with_context(|| format!("{method} {path}: no answer within {timeout:?}"))?
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<Bytes>,
) -> crate::Result<Response> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(connection);
    let has_body = json_body.is_some();
    let body = json_body.unwrap_or_default();
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if has_body {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(body))
        .context("building the request")?;
    let response = sender.send_request(request).await.context("sending")?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the body")?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status,
        headers,
        body,
    })
}
