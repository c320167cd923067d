//! The streamed-answer check (issue 20, `docs/streaming.md`): a proxied event stream from the
//! checker's own loopback upstream must come back with its head signed in the streamed form
//! (`response_stream`), its body verifying incrementally up to a valid end frame, and the events
//! exactly as the upstream sent them. A truncated, altered or unsigned stream fails.

use std::time::Duration;

use keyholder_protocol::paths::{HEADER_KEYHOLDER_SIGNATURE, PATH_IDENTITY, PATH_PROXY};
use keyholder_protocol::request_id::new_request_id;
use keyholder_protocol::response_sig::IdentityDocument;
use keyholder_protocol::response_stream::{is_stream_header, StreamVerifier};
use reqwest::Method;
use serde_json::json;

use keyholder_client::platform::now_unix;
use keyholder_client::transport::{Outgoing, RawPlatform as _, RawResponse};
use keyholder_client::TokenData;

use super::{expect, Ctx, Run};

/// The events the upstream sends, one write each with a pause between them.
const EVENTS: usize = 5;

fn event(i: usize) -> String {
    format!("id: {i}\ndata: keyholder-check event {i}\n\n")
}

/// A loopback upstream that answers one `text/event-stream` of [`EVENTS`] events, 20 ms apart, with
/// no length (so the webhook must stream it), then closes.
struct EventUpstream {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl EventUpstream {
    async fn start() -> std::io::Result<Self> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/keyholder-check-events", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    let _ = stream.read(&mut buf).await;
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for i in 0..EVENTS {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if stream.write_all(event(i).as_bytes()).await.is_err() {
                            return;
                        }
                        let _ = stream.flush().await;
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(EventUpstream { url, task })
    }
}

impl Drop for EventUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn streamed_answer(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx
        .stream_service
        .clone()
        .ok_or("no --stream-service given")?;
    // The key answers are signed with: the pinned one, else the identity the webhook publishes.
    let resp = ctx
        .probe(run, &Outgoing::new(Method::GET, PATH_IDENTITY), "")
        .await;
    expect(&resp, &[200], None)?;
    let document: IdentityDocument = resp
        .as_ref()
        .ok()
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .ok_or("GET /v1/identity: not an identity document")?;
    if let Some(pin) = ctx.platform.pin() {
        if pin.expected_key_id() != document.key_id {
            return Err(format!(
                "GET /v1/identity names key {}, not the pinned {}",
                document.key_id,
                pin.expected_key_id()
            ));
        }
    }
    let key = document
        .verifying_key()
        .map_err(|e| format!("GET /v1/identity: {e}"))?;

    let data = TokenData::new().secret("accessToken", "keyholder-check-not-a-secret");
    let ticket = ctx.tickets.store(&service);
    let stored = ctx.agent.store(ticket.expose(), &service, &data).await;
    run.call(
        &format!("POST /v1/store {{ticket:<masked>, service:{service}, tokenData:<masked>}}"),
        &stored,
    );
    stored.map_err(|e| e.to_string())?;

    let upstream = EventUpstream::start()
        .await
        .map_err(|e| format!("local upstream: {e}"))?;
    let request_id = new_request_id();
    let body = serde_json::to_vec(&json!({
        "ticket": ctx.tickets.proxy(&service).expose(),
        "service": service,
        "upstream": {"url": upstream.url, "method": "GET"},
        "headerTemplates": {"Authorization": "Bearer ${TOKEN}"},
        "requestId": request_id,
    }))
    .map_err(|e| e.to_string())?;
    let out = ctx
        .platform
        .signed_outgoing(PATH_PROXY, body, now_unix(), &request_id);
    let (url, target) = ctx.platform.target(&out.path, &out.query);
    let mut request = reqwest::Client::new()
        .post(url)
        .header("X-Request-Id", &request_id)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(out.body.clone().unwrap_or_default());
    for (name, value) in &out.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let note = format!("event stream from {}", upstream.url);
    let mut response = match tokio::time::timeout(ctx.timeout, request.send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(format!("POST {PATH_PROXY}: {}", e.without_url())),
        Err(_) => return Err(format!("POST {PATH_PROXY}: no answer head in time")),
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let answer_id = header("x-request-id").unwrap_or_default().to_owned();
    let signature = header(HEADER_KEYHOLDER_SIGNATURE).map(str::to_owned);
    // Verified as it arrives: each chunk goes through the verifier before it counts as body.
    let mut verifier = match signature.as_deref() {
        Some(sig) if is_stream_header(sig) => Some(StreamVerifier::new(
            &key, sig, "POST", &target, &answer_id, status,
        )),
        _ => None,
    };
    let mut received = Vec::new();
    let mut body = Vec::new();
    let read = loop {
        match tokio::time::timeout(ctx.timeout, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                received.extend_from_slice(&chunk);
                if let Some(Ok(verifier)) = verifier.as_mut() {
                    verifier.push(&chunk, &mut body);
                }
            }
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => break Err(format!("the stream broke off: {}", e.without_url())),
            Err(_) => break Err("the stream stalled".to_owned()),
        }
    };
    let raw = RawResponse {
        status,
        headers: headers.clone(),
        body: received.into(),
        request_id: request_id.clone(),
    };
    run.record(&out, &note, &Ok(raw));
    read?;
    if status != 200 {
        return Err(format!(
            "expected 200 from the upstream's stream, got {status}"
        ));
    }
    let verifier = match verifier {
        Some(Ok(verifier)) => verifier,
        Some(Err(e)) => return Err(format!("the streamed answer's head does not verify: {e}")),
        None => {
            return Err(format!(
                "the answer is not signed in the streamed form (X-Keyholder-Signature: {})",
                signature.as_deref().unwrap_or("none")
            ))
        }
    };
    verifier.finish().map_err(|e| {
        format!("the streamed answer does not verify (end frame missing, wrong or not over the body sent): {e}")
    })?;
    let expected: String = (0..EVENTS).map(event).collect();
    if body != expected.as_bytes() {
        return Err(format!(
            "the events arrived altered: {:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}
