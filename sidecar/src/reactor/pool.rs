//! The endpoint's connections: HTTP/1.1 keep-alive connections to one address, each carrying one call at a time and
//! kept for the next call once its answer has been read. A kept connection the endpoint has closed meanwhile (its
//! keep-alive ran out) is noticed when a call is sent on it: if the request had not left yet, hyper hands it back and
//! it goes out on a new connection, as general-purpose clients do; once it has left, the failure is the call's.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// Connections idle longer than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The keep-alive connections to one endpoint.
#[derive(Debug)]
pub struct Connections {
    /// `host:port`, as connected to.
    address: String,
    /// The `Host` header.
    host: HeaderValue,
    /// The request target (origin form: the path and query).
    target: Uri,
    /// Connections whose last answer has been read, the most recently used last.
    idle: Mutex<Vec<(Sender, Instant)>>,
    /// How long a connection may stay idle.
    idle_timeout: Duration,
}

/// A connection lent to one call; [`Connections::keep`] gives it back once the answer has been read.
#[derive(Debug)]
pub struct Lent(Sender);

impl Connections {
    /// Connections to the host of an `http://` URL.
    pub fn new(url: &Uri) -> anyhow::Result<Self> {
        if url.scheme_str() != Some("http") {
            anyhow::bail!("endpoint URL {url}: only http:// is supported");
        }
        let authority = url
            .authority()
            .ok_or_else(|| anyhow::anyhow!("endpoint URL {url}: no host"))?;
        // Host and port only: user information in the URL is not sent.
        let host = match authority.port_u16() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_string(),
        };
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let target = url
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| anyhow::anyhow!("endpoint URL {url}: {e}"))?;
        Ok(Self {
            address,
            host: HeaderValue::from_str(&host)?,
            target,
            idle: Mutex::new(Vec::new()),
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    /// Sends `request` (its target and `Host` set here) and returns the answer with the connection it came on.
    pub async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lent), String> {
        *request.uri_mut() = self.target.clone();
        request.headers_mut().insert(HOST, self.host.clone());
        while let Some(mut sender) = self.reusable() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, Lent(sender))),
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection was closed before it could be; another one takes it.
                    Some(unsent) => request = unsent,
                    None => return Err(describe(&e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        match sender.send_request(request).await {
            Ok(response) => Ok((response, Lent(sender))),
            Err(e) => Err(describe(&e)),
        }
    }

    /// Keeps a connection whose answer has been read for the next call.
    pub fn keep(&self, lent: Lent) {
        if lent.0.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push((lent.0, Instant::now()));
        }
    }

    /// Closes the connections idle too long (the least recently used first in the list).
    pub fn close_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let expired = idle.partition_point(|(_, since)| since.elapsed() >= self.idle_timeout);
            idle.drain(..expired);
        }
    }

    /// The most recently used idle connection still open, dropping the ones closed or idle too long.
    fn reusable(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.address))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| describe(&e))?;
        tokio::spawn(async move {
            // Ends when the connection closes or its last sender is dropped; a broken connection fails its call.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// An error with its causes.
fn describe(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_path_and_the_host_the_authority() {
        let c = connections("http://127.0.0.1:8080/events?x=1");
        assert_eq!(c.address, "127.0.0.1:8080");
        assert_eq!(c.host, "127.0.0.1:8080");
        assert_eq!(c.target, "/events?x=1");
        let c = connections("http://email");
        assert_eq!(c.address, "email:80");
        assert_eq!(c.host, "email");
        assert_eq!(c.target, "/");
        let c = connections("http://user:secret@[::1]:8080");
        assert_eq!(c.address, "[::1]:8080");
        assert_eq!(c.host, "[::1]:8080");
        let https: Uri = "https://email/x".parse().expect("a URI");
        assert!(Connections::new(&https).is_err());
    }

    /// Connections kept for the next call.
    fn kept(connections: &Connections) -> usize {
        connections.idle.lock().map_or(0, |idle| idle.len())
    }

    fn connections(url: &str) -> Connections {
        Connections::new(&url.parse().expect("a URI")).expect("an http:// URL")
    }

    /// A server on 127.0.0.1 that answers one request per connection, `204` without `Connection: close`, then
    /// closes it (as an endpoint does when its keep-alive runs out); the connections it accepted, counted.
    async fn closing_server(
        calls: usize,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<usize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("an address");
        let server = tokio::spawn(async move {
            for accepted in 1..=calls {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.ends_with(b"\r\n\r\nbody") {
                    let n = socket.read(&mut buf).await.expect("read");
                    assert!(n > 0, "the request ended early");
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&request).to_lowercase();
                assert!(text.starts_with("post /events?x=1 http/1.1\r\n"), "{text}");
                assert!(text.contains(&format!("host: {addr}\r\n")), "{text}");
                socket
                    .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .expect("write");
                if accepted == calls {
                    return accepted;
                }
            }
            calls
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_replaced_without_failing_the_call() {
        let (addr, server) = closing_server(3).await;
        let connections = connections(&format!("http://{addr}/events?x=1"));
        for call in 1..=3 {
            let request = Request::post("/ignored")
                .body(Full::new(Bytes::from_static(b"body")))
                .expect("a request");
            let (response, lent) = connections.send(request).await.unwrap_or_else(|e| {
                panic!("call {call} failed: {e}");
            });
            assert_eq!(response.status(), 204);
            connections.keep(lent);
        }
        assert_eq!(server.await.expect("the server"), 3);
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("an address");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let service = hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            });
            // Serves the one connection until the client closes it.
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await
        });
        let mut connections = connections(&format!("http://{addr}/events"));
        connections.idle_timeout = Duration::from_millis(200);
        let request = Request::post("/")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let (_, lent) = connections.send(request).await.expect("the call");
        connections.keep(lent);
        connections.close_idle();
        assert_eq!(kept(&connections), 1, "not idle long enough yet");
        tokio::time::sleep(Duration::from_millis(300)).await;
        connections.close_idle();
        assert_eq!(kept(&connections), 0);
        let served = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection closed");
        assert!(served.expect("the server").is_ok());
    }
}
