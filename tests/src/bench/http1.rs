//! A minimal HTTP/1.1 keep-alive client for the load generator: it writes prepared request bytes
//! and reads one response (Content-Length or chunked bodies), so the generator costs as little as
//! possible.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    addr: std::net::SocketAddr,
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// How the body is framed: `Some(length)`, or `None` for a chunked body.
fn content_length(head: &[u8]) -> io::Result<Option<usize>> {
    let text = std::str::from_utf8(head).map_err(|_| io::Error::other("non-UTF-8 head"))?;
    for line in text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| io::Error::other("bad content-length"));
            }
            if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Ok(None);
            }
        }
    }
    Ok(Some(0))
}

/// The end of a complete chunked body starting at `from`, and its payload length.
fn chunked_end(buf: &[u8], mut from: usize) -> io::Result<Option<(usize, usize)>> {
    let mut payload = 0;
    loop {
        let Some(line) = buf[from..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[from..from + line])
            .map_err(|_| io::Error::other("bad chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other("bad chunk size"))?;
        let data = from + line + 2;
        if size == 0 {
            // No trailers from our servers: the last chunk is followed by one CRLF.
            return Ok((buf.len() >= data + 2).then_some((data + 2, payload)));
        }
        if buf.len() < data + size + 2 {
            return Ok(None);
        }
        payload += size;
        from = data + size + 2;
    }
}

impl Connection {
    /// Connects.
    pub async fn open(addr: std::net::SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            addr,
        })
    }

    /// Sends `request` and returns the status and body length. Reconnects once if the server
    /// closed the idle connection.
    pub async fn send(&mut self, request: &[u8]) -> io::Result<(u16, usize)> {
        match self.send_once(request).await {
            Ok(r) => Ok(r),
            Err(_) => {
                *self = Connection::open(self.addr).await?;
                self.send_once(request).await
            }
        }
    }

    async fn send_once(&mut self, request: &[u8]) -> io::Result<(u16, usize)> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(end) = find_header_end(&self.buf) {
                break end;
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let status = std::str::from_utf8(self.buf.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        let Some(len) = content_length(&self.buf[..head_end])? else {
            // Chunked (a streamed proxy answer): read to the last chunk.
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                if let Some((_, payload)) = chunked_end(&self.buf, head_end)? {
                    return Ok((status, payload));
                }
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        while self.buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, len))
    }
}

/// Builds request bytes.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n").as_bytes());
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}
