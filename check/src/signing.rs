//! Checks for keys that sign rather than travel (Keyholder issue 24): an AWS key's secret halves
//! (`secretAccessKey`, `sessionToken`) are sealed like the protocol's sensitive fields, so a
//! platform never reads them in a store answer, a `get`, a `list` or a `list_batch`.

use super::protocol24::{body_json, body_text, random_seed, store_post};
use super::{expect, Ctx, Run};

/// Stores an AWS key and looks for its secret in everything the platform can read.
pub(crate) async fn aws_secret_sealed(ctx: &Ctx, run: &mut Run) -> Result<(), String> {
    let service = ctx.probe_service("aws");
    // A well-formed key id (16+ letters and digits) and random secret halves.
    let key_id = format!("AKIA{}", &random_seed()[..16]);
    let secret = format!("{}/{}", random_seed(), &random_seed()[..8]);
    let token = format!("FwoG{}", random_seed());
    let verdict = async {
        let ticket = ctx.tickets.store(&service);
        let stored = ctx
            .probe(
                run,
                &store_post(
                    &ticket,
                    &service,
                    serde_json::json!({
                        "tokenType": "aws",
                        "accessKeyId": key_id,
                        "secretAccessKey": secret,
                        "sessionToken": token,
                    }),
                ),
                "tokenData {tokenType: aws, accessKeyId, secretAccessKey, sessionToken}",
            )
            .await;
        expect(&stored, &[200], None)?;
        let leaks = |what: &str, text: &str| -> Result<(), String> {
            if text.contains(&secret) || text.contains(&token) {
                return Err(format!("{what} holds the secretAccessKey or sessionToken"));
            }
            Ok(())
        };
        leaks("the store answer", &body_text(&stored))?;
        let meta = &body_json(&stored)["meta"];
        if meta.get("secretAccessKey").is_some() || meta.get("sessionToken").is_some() {
            return Err("the store answer's meta names the secret fields".into());
        }
        leaks(
            "what the platform reads",
            &ctx.platform_views(run, &service).await?,
        )
    }
    .await;
    ctx.delete_token(run, &service).await;
    verdict
}
