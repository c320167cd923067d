//! Signs answers in batches: the answers a worker thread finishes in one turn of its event loop
//! share one Ed25519 signature over a Merkle tree of them (the batch form of `response_sig`).

use std::cell::RefCell;
use std::sync::Arc;

use keyholder_protocol::response_sig::{sign_response_batch, ResponseToSign};
use tokio::sync::oneshot;

use crate::vault::keyring::KeyRing;

struct Pending {
    response: ResponseToSign,
    reply: oneshot::Sender<String>,
}

thread_local! {
    /// Answers of this worker thread waiting for the batch's signing task.
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// The `X-Keyholder-Signature` value for `response`. The first answer of a batch spawns the
/// signing task on this worker thread; it runs after the tasks woken in this turn and the next,
/// which add their answers meanwhile. One signature costs as much CPU as the rest of a credential
/// GET, so under load this roughly halves the work per answer; alone, an answer gets the plain
/// form and waits two task switches more.
pub async fn sign(keys: Arc<KeyRing>, response: ResponseToSign) -> String {
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        response: response.clone(),
        reply,
    };
    let first = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.push(pending);
        p.len() == 1
    });
    if first {
        let keys = Arc::clone(&keys);
        actix_web::rt::spawn(async move {
            // One turn more (after the runtime polled for wake-ups): the replies of a PostgreSQL
            // batch reach this worker one by one from another thread, and without it they were
            // signed in ones and twos (a fifth of a replica's CPU). SQLite's batches are woken
            // together; for them it changes nothing measurable.
            tokio::task::yield_now().await;
            sign_pending(&keys)
        });
    }
    match answer.await {
        Ok(header) => header,
        // The signing task never ran (the worker is stopping): sign alone.
        Err(_) => sign_response_batch(keys.identity(), &[response])
            .pop()
            .unwrap_or_default(),
    }
}

fn sign_pending(keys: &KeyRing) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let (responses, replies): (Vec<ResponseToSign>, Vec<oneshot::Sender<String>>) =
        pending.into_iter().map(|p| (p.response, p.reply)).unzip();
    tracing::trace!(batch = responses.len(), "signed answers");
    let headers = sign_response_batch(keys.identity(), &responses);
    for (reply, header) in replies.into_iter().zip(headers) {
        let _ = reply.send(header);
    }
}
