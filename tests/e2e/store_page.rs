//! The keyholder's own `/store` page (issue 17, item 10) over plain HTTP: its security headers,
//! nothing inline but its hashed style, nothing from another origin, a good ticket left unspent
//! for the `/v1/store` call the page makes, and every bad link answered with a readable page that
//! carries the refusal's status and wire code. (The form itself is driven in Chromium in
//! `browser.rs`.)

use keyholder_protocol::paths::*;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use keyholder_tests::*;
use serde_json::json;

async fn page(kh: &Keyholder, query: &[(&str, &str)]) -> Answer {
    let url = reqwest::Url::parse_with_params(&kh.url(PATH_STORE_PAGE), query).unwrap();
    read(kh.http.get(url).send().await.unwrap()).await
}

fn text(answer: &Answer) -> String {
    String::from_utf8(answer.body.clone()).unwrap()
}

#[track_caller]
fn assert_refusal_page(answer: &Answer, status: u16, code: &str) {
    let body = text(answer);
    assert_eq!(answer.status, status, "{body}");
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(answer
        .header("content-security-policy")
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert!(body.contains(&format!("data-code=\"{code}\"")), "{body}");
    assert!(body.contains("This store link cannot be used"), "{body}");
    assert!(
        !body.contains("store-form") && !body.contains("<script"),
        "{body}"
    );
}

#[tokio::test]
async fn store_page_headers_unspent_ticket_and_refusals() {
    let mut kh = Keyholder::start().await;
    let unbound = page(&kh, &[("ticket", "x.y"), ("service", "github")]).await;
    assert_refusal_page(&unbound, 403, "setup_required");
    kh.bind().await;

    let ticket = kh.ticket(Purpose::Store, "github");
    let answer = page(&kh, &[("ticket", &ticket), ("service", "github")]).await;
    let body = text(&answer);
    assert_eq!(answer.status, 200, "{body}");
    let csp = answer.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(answer.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(
        answer.header("referrer-policy").as_deref(),
        Some("no-referrer")
    );
    assert_eq!(answer.header("cache-control").as_deref(), Some("no-store"));
    // The one inline style is the one the policy's hash allows; every script comes from this
    // origin's /store.js; nothing names another origin.
    let style = body
        .split("<style>")
        .nth(1)
        .unwrap()
        .split("</style>")
        .next()
        .unwrap();
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(style));
    assert!(csp.contains(&format!("style-src 'sha256-{hash}'")), "{csp}");
    assert_eq!(body.matches("<script").count(), 1, "{body}");
    assert!(
        body.contains("<script src=\"store.js\"></script>"),
        "{body}"
    );
    assert!(
        !body.contains("http://") && !body.contains("https://") && !body.contains("//"),
        "{body}"
    );

    let script = read(
        kh.http
            .get(kh.url(PATH_STORE_PAGE_SCRIPT))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(script.status, 200);
    assert!(script
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    let js = text(&script);
    assert!(
        js.contains("fetch('v1/store'") && !js.contains("innerHTML"),
        "{js}"
    );
    assert!(!js.contains("http://") && !js.contains("https://"));

    // Showing the page did not spend the ticket: the page's own /v1/store call does.
    let stored = kh
        .store_with(&ticket, "github", json!({"accessToken": "ghp_page_ticket"}))
        .await;
    stored.assert_ok();

    // Bad links, each a page naming the refusal; none of them spends anything.
    let n = now();
    let forged = encode_ticket(
        &HmacSecret::generate(),
        &kh.claims(Purpose::Store, "github"),
    );
    let expired = kh.ticket_from(&TicketClaims::new(
        "user_test",
        "github",
        Purpose::Store,
        n - 120,
        n - 60,
        random_hex(16),
    ));
    let reveal = kh.ticket(Purpose::UserReveal, "github");
    let other_service = kh.ticket(Purpose::Store, "gitlab");
    for (query, status, code) in [
        (
            vec![("ticket", forged.as_str()), ("service", "github")],
            401,
            "ticket_invalid",
        ),
        (
            vec![("ticket", "not-a-ticket"), ("service", "github")],
            401,
            "ticket_invalid",
        ),
        (
            vec![("ticket", expired.as_str()), ("service", "github")],
            401,
            "ticket_expired",
        ),
        (
            vec![("ticket", reveal.as_str()), ("service", "github")],
            401,
            "ticket_invalid",
        ),
        (
            vec![("ticket", other_service.as_str()), ("service", "github")],
            401,
            "ticket_invalid",
        ),
        (vec![("service", "github")], 400, "invalid_request"),
        (vec![("ticket", ticket.as_str())], 400, "invalid_request"),
    ] {
        let answer = page(&kh, &query).await;
        assert_refusal_page(&answer, status, code);
    }
    let bad_query = read(
        kh.http
            .get(format!(
                "{}?ticket=%ZZ&ticket=a&service=",
                kh.url(PATH_STORE_PAGE)
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(bad_query.status == 400, "{}", text(&bad_query));
    // The reveal ticket shown to the page was not spent either.
    assert_eq!(kh.credential_with(&reveal, "github").await.status, 200);

    // Sealed by the owner: the page says so (and /v1/store would refuse too).
    let args = keyholder::cli::data_folder::OwnerArgs {
        data: kh.data_args(),
        json: false,
    };
    keyholder::cli::seal::set_sealed(&args, true).unwrap();
    kh.server
        .as_ref()
        .unwrap()
        .state
        .reload
        .follow_owner_changes()
        .await
        .unwrap();
    let ticket = kh.ticket(Purpose::Store, "github");
    let sealed = page(&kh, &[("ticket", &ticket), ("service", "github")]).await;
    assert_refusal_page(&sealed, 503, "sealed");
}
