//! Replay memory across a restart: a request id and a ticket nonce used before the webhook restarts
//! (by the operator's `--restart-cmd`, run with `sh -c`) must still be refused after it.

use std::time::{Duration, Instant};

use keyholder_client::platform::now_unix;
use keyholder_protocol::request_id::new_request_id;

use super::{expect, Ctx, Run};

pub(crate) async fn replay_after_restart(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let Some(cmd) = &ctx.restart_cmd else {
        return Err("no restart command given".into());
    };
    let p = &ctx.platform;
    let id = new_request_id();
    let ts = now_unix();
    let first = ctx
        .signed_probe(run, p, ts, &id, "signed, request id R, before the restart")
        .await;
    expect(&first, &[200], None)?;
    let ticket = ctx.tickets.credential(&ctx.service);
    let ticket_get = ctx.credential_get(&ticket, &ctx.service);
    let first = ctx
        .probe(run, &ticket_get, "ticket T, before the restart")
        .await;
    // Nothing is stored under this service: 404 means the ticket itself was accepted.
    expect(&first, &[200, 404], None)?;

    restart(ctx, run, cmd).await?;

    let again = ctx
        .signed_probe(
            run,
            p,
            ts,
            &id,
            "same request, same request id R, after the restart",
        )
        .await;
    expect(&again, &[401], Some("auth_failed"))
        .map_err(|e| format!("request id R after the restart: {e}"))?;
    let again = ctx
        .probe(run, &ticket_get, "same ticket T, after the restart")
        .await;
    expect(&again, &[401], Some("ticket_invalid"))
        .map_err(|e| format!("ticket T after the restart: {e}"))
}

/// Runs the restart command, then waits (up to the request timeout, at least 30 s) for health.
async fn restart(ctx: &Ctx, run: &mut Run, cmd: &str) -> Result<(), String> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("running the restart command: {e}"))?;
    run.note(format!("sh -c <restart command> -> {status}"));
    if !status.success() {
        return Err(format!("the restart command failed: {status}"));
    }
    let deadline = Instant::now() + ctx.timeout.max(Duration::from_secs(30));
    loop {
        match ctx.platform.health().await {
            Ok(_) => {
                run.note("GET /v1/health -> ok (the webhook is back)");
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "the webhook did not come back after the restart: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
