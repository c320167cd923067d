//! Local upstream, OAuth and token-minting servers on 127.0.0.1 for the proxy, refresh and minting
//! tests: a small HTTP/1.1 server on raw TCP (full control over every header it sends) that
//! records what it received and counts the connections made to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Verifier;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as an `application/x-www-form-urlencoded` form.
    pub fn form(&self) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(&self.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Option<Duration>,
}

impl Reply {
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
            delay: None,
        }
    }

    pub fn json(status: u16, value: Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(&value).unwrap(),
            delay: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A running mock server; stops when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Starts a server on `127.0.0.1:0` answering every request with `handler`.
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (reqs, conns) = (Arc::clone(&requests), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (reqs, handler) = (Arc::clone(&reqs), Arc::clone(&handler));
                tokio::spawn(async move {
                    let _ = serve(stream, reqs, handler).await;
                });
            }
        });
        MockServer {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// A server answering 200 `ok` to everything.
    pub async fn ok() -> MockServer {
        Self::start(|_| Reply::text(200, "ok")).await
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://127.0.0.1:<port>` (the origin as the keyholder writes it).
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// TCP connections accepted (0 proves nothing was sent).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Handler,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 256 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let recorded = Recorded {
        method: method.clone(),
        target,
        headers,
        body,
    };
    requests.lock().unwrap().push(recorded.clone());
    let reply = handler(&recorded);
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let mut out = format!("HTTP/1.1 {} Mock\r\n", reply.status);
    let mut connection = "close".to_string();
    for (name, value) in &reply.headers {
        if name.eq_ignore_ascii_case("connection") {
            connection = format!("close, {value}");
        } else {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str(&format!("Connection: {connection}\r\n"));
    out.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
    stream.write_all(out.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(&reply.body).await?;
    }
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// An RSA key pair made in the test, to sign as a service account or GitHub App would, and to
/// verify the keyholder's JWTs with the public half.
pub struct TestRsa {
    key: PKey<Private>,
}

impl TestRsa {
    pub fn generate() -> TestRsa {
        TestRsa {
            key: PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap(),
        }
    }

    /// PKCS#8 PEM of the private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn private_pem(&self) -> String {
        String::from_utf8(self.key.private_key_to_pem_pkcs8().unwrap()).unwrap()
    }

    /// Verifies an RS256 JWT with the public key; returns its claims when the signature holds.
    pub fn verify_jwt(&self, jwt: &str) -> Option<Value> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = jwt.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&b64.decode(h).ok()?).ok()?;
        if header["alg"] != "RS256" {
            return None;
        }
        let signature = b64.decode(s).ok()?;
        let public = PKey::public_key_from_pem(&self.key.public_key_to_pem().ok()?).ok()?;
        let mut verifier = Verifier::new(MessageDigest::sha256(), &public).ok()?;
        verifier.update(format!("{h}.{p}").as_bytes()).ok()?;
        if !verifier.verify(&signature).ok()? {
            return None;
        }
        serde_json::from_slice(&b64.decode(p).ok()?).ok()
    }
}

/// How a [`FaultyServer`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Reads the request, never answers.
    Hang,
    /// Reads the request, then resets the connection (RST).
    Reset,
    /// Sends its status line and headers one byte a second.
    DripHead,
    /// Sends a valid head, then the body one byte a second.
    DripBody,
    /// Sends a chunked body that never ends, as fast as it is read.
    EndlessBody,
    /// Sends a 2 MiB header.
    HugeHeader,
    /// Answers the first request of a connection and keeps it open, then closes it without an
    /// answer when the next request arrives on it: the race of a server closing an idle keep-alive
    /// connection just as the client reuses it.
    CloseOnReuse,
}

/// An upstream (or token endpoint) that fails in one way; counts connections; stops when dropped.
pub struct FaultyServer {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyServer {
    pub async fn start(fault: Fault) -> FaultyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let conns = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = misbehave(stream, fault).await;
                });
            }
        });
        FaultyServer {
            addr,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn misbehave(mut stream: TcpStream, fault: Fault) -> std::io::Result<()> {
    // Read the request head (and whatever body arrived with it).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let second = Duration::from_secs(1);
    match fault {
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Fault::Reset => {
            // Deprecated because a lingering close blocks; with a zero linger it sends RST at once.
            #[allow(deprecated)]
            stream.set_linger(Some(Duration::ZERO))?;
            drop(stream);
        }
        Fault::DripHead => {
            for b in
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            {
                stream.write_all(&[*b]).await?;
                tokio::time::sleep(second).await;
            }
        }
        Fault::DripBody => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
                .await?;
            loop {
                stream.write_all(b"x").await?;
                tokio::time::sleep(second).await;
            }
        }
        Fault::EndlessBody => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await?;
            let mut piece = format!("{:x}\r\n", 64 * 1024).into_bytes();
            piece.extend(std::iter::repeat_n(b'y', 64 * 1024));
            piece.extend_from_slice(b"\r\n");
            loop {
                stream.write_all(&piece).await?;
            }
        }
        Fault::CloseOnReuse => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                .await?;
            // Wait for the next request on this connection, then close without answering.
            let _ = stream.read(&mut chunk).await?;
            drop(stream);
        }
        Fault::HugeHeader => {
            let mut head = b"HTTP/1.1 200 OK\r\nX-Huge: ".to_vec();
            head.extend(std::iter::repeat_n(b'h', 2 << 20));
            head.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
            stream.write_all(&head).await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
    Ok(())
}

/// An upstream that answers every request with a chunked body sent piece by piece: each piece
/// after its delay. It records whether the client went away before the end (a write failed).
pub struct StreamingServer {
    pub addr: SocketAddr,
    /// Set when a write failed: the reader (the keyholder) closed the connection.
    pub client_gone: Arc<std::sync::atomic::AtomicBool>,
    /// Requests seen (head and body as text).
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamingServer {
    /// `headers` go into the head after the status line (`Name: value` each).
    pub async fn start(
        status: u16,
        headers: &[(&str, &str)],
        pieces: Vec<(Duration, Vec<u8>)>,
    ) -> StreamingServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut head = format!("HTTP/1.1 {status} OK\r\nTransfer-Encoding: chunked\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let pieces = Arc::new(pieces);
        let (gone, reqs) = (Arc::clone(&client_gone), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (head, pieces, gone, reqs) = (
                    head.clone(),
                    Arc::clone(&pieces),
                    Arc::clone(&gone),
                    Arc::clone(&reqs),
                );
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    reqs.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    let write = async {
                        stream.write_all(head.as_bytes()).await?;
                        for (delay, piece) in pieces.iter() {
                            tokio::time::sleep(*delay).await;
                            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
                            framed.extend_from_slice(piece);
                            framed.extend_from_slice(b"\r\n");
                            stream.write_all(&framed).await?;
                            stream.flush().await?;
                        }
                        stream.write_all(b"0\r\n\r\n").await?;
                        stream.flush().await
                    };
                    if write.await.is_err() {
                        gone.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        StreamingServer {
            addr,
            client_gone,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for StreamingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
