//! In a real browser (headless Chromium through chromedriver): a page on a second loopback origin
//! stores a credential with a store ticket through a real CORS preflight and fetches it back with a
//! credential ticket, and the `/bind` page renders (a screenshot is kept in the test output).
//! Skipped, saying so, only when Chromium is absent outside CI; in CI (`CI` set) it must run.

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use keyholder_protocol::paths::*;
use keyholder_protocol::{HmacSecret, Purpose};
use keyholder_tests::webdriver::{find_browser, Browser};
use keyholder_tests::Keyholder;
use serde_json::{json, Value};

const SECRET: &str = "ghp_FromTheBrowser_5e1f";

/// The platform's frontend stand-in: a page on another origin (another loopback port).
fn start_platform_page() -> (String, actix_web::dev::ServerHandle) {
    let server = HttpServer::new(|| {
        App::new().route(
            "/",
            web::get().to(|| async {
                HttpResponse::Ok()
                    .content_type("text/html; charset=utf-8")
                    .body("<!doctype html><html><head><title>platform</title></head><body><h1>Platform frontend</h1></body></html>")
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://{addr}"), handle)
}

const STORE_AND_FETCH: &str = r#"
const [base, storeTicket, credentialTicket, secret, done] = arguments;
(async () => {
  const out = { origin: location.origin };
  const stored = await fetch(base + '/v1/store', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ ticket: storeTicket, service: 'github',
                           tokenData: { accessToken: secret, tokenType: 'oauth' } }),
  });
  out.storeStatus = stored.status;
  out.store = await stored.json();
  out.storeRequestId = stored.headers.get('X-Request-Id');
  const query = new URLSearchParams({ ticket: credentialTicket, service: 'github' });
  const fetched = await fetch(base + '/v1/credential?' + query);
  out.credentialStatus = fetched.status;
  out.credential = await fetched.json();
  // The same ticket again: the refusal is readable too (CORS on errors).
  const replayed = await fetch(base + '/v1/credential?' + query);
  out.replayStatus = replayed.status;
  out.replay = await replayed.json();
  return out;
})().then(done, (e) => done({ error: String(e) }));
"#;

#[tokio::test]
async fn store_and_fetch_from_another_origin_and_the_bind_page_renders() {
    let Some((chromium, chromedriver)) = find_browser() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI: /usr/bin/chromium or /usr/bin/chromedriver is missing (.ci/run installs chromium and chromium-driver)");
        }
        eprintln!(
            "SKIPPED browser test: Chromium not found. Install it with `apt-get install -y chromium chromium-driver` \
             (or set KEYHOLDER_CHROMIUM and KEYHOLDER_CHROMEDRIVER)."
        );
        return;
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut kh = Keyholder::start_with(|c| {
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        let (platform, platform_handle) = start_platform_page();
        let browser = Browser::start(&chromium, &chromedriver).await.unwrap();

        // The /bind page, opened with a live code before the platform exchanged it.
        let code = kh.issue_code(false);
        browser
            .goto(&format!("{}{PATH_BIND}?code={}", kh.base, code.code))
            .await
            .unwrap();
        let page = browser
            .execute(
                "return { title: document.title, status: document.getElementById('status').textContent, \
                 connect: document.getElementById('connect') && document.getElementById('connect').getAttribute('href') };",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(page["title"], "Keyholder", "{page}");
        assert_eq!(page["status"], "Not bound yet", "{page}");
        assert_eq!(page["connect"], Value::from(code.registration_url.clone()), "{page}");
        let png = browser.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&dir).unwrap();
        let shot = dir.join("bind-page.png");
        std::fs::write(&shot, &png).unwrap();
        println!("bind page screenshot: {}", shot.display());

        // The platform exchanges the code; from now on it mints tickets.
        let answer = kh.exchange(&code.code).await;
        assert_eq!(answer.status, 200);
        kh.secret = Some(HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap());

        // The owner's browser on the platform's origin stores, then fetches.
        browser.goto(&format!("{platform}/")).await.unwrap();
        let store = kh.ticket(Purpose::Store, "github");
        let fetch = kh.ticket(Purpose::UserReveal, "github");
        let out = browser
            .execute_async(STORE_AND_FETCH, vec![json!(kh.base), json!(store), json!(fetch), json!(SECRET)])
            .await
            .unwrap();
        assert_eq!(out["origin"], Value::from(platform.clone()), "{out}");
        assert_ne!(out["origin"], Value::from(kh.base.clone()), "two origins");
        assert_eq!(out["storeStatus"], 200, "{out}");
        assert_eq!(out["store"]["status"], "stored", "{out}");
        assert!(out["storeRequestId"].is_string(), "exposed header: {out}");
        assert_eq!(out["credentialStatus"], 200, "{out}");
        assert_eq!(out["credential"]["token"]["accessToken"], SECRET, "{out}");
        assert_eq!(out["replayStatus"], 401, "{out}");
        assert_eq!(out["replay"]["error"], "ticket_invalid", "{out}");

        // The JSON POST was preceded by a real preflight, answered 204.
        let metrics_url = kh.server.as_ref().unwrap().metrics_url().unwrap();
        let text = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
        let preflight = format!("keyholder_http_requests_total{{route=\"{PATH_STORE}\",method=\"OPTIONS\",status=\"204\"}} 1");
        assert!(text.lines().any(|l| l == preflight), "no preflight seen:\n{text}");

        browser.quit().await;
        platform_handle.stop(false).await;
        kh.stop().await;
    })
    .await
    .expect("browser test finished in time");
}

/// Reads the store page's state once its script has answered (or gives up after 15 s).
async fn store_outcome(browser: &Browser) -> Value {
    let started = std::time::Instant::now();
    loop {
        let out = browser
            .execute(
                "const r = document.getElementById('result'); \
                 return { state: r.dataset.state, result: r.textContent, \
                 meta: document.getElementById('stored-meta').textContent, \
                 secretBox: document.getElementById('secret').value, \
                 href: location.href, html: document.documentElement.outerHTML };",
                vec![],
            )
            .await
            .unwrap();
        if out["state"] == "ok" || out["state"] == "error" {
            return out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no answer on the page: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fills the store page's form as the owner would (typing, then clicking Store).
async fn fill_and_submit(browser: &Browser, secret: &str, token_type: &str, meta: &str) {
    let secret_box = browser.find("#secret").await.unwrap();
    browser.type_into(&secret_box, secret).await.unwrap();
    let type_box = browser.find("#tokenType").await.unwrap();
    browser.type_into(&type_box, token_type).await.unwrap();
    let meta_box = browser.find("#meta").await.unwrap();
    browser.type_into(&meta_box, meta).await.unwrap();
    let submit = browser.find("#submit").await.unwrap();
    browser.click(&submit).await.unwrap();
}

/// Issue 17, item 10: the owner stores through the keyholder's own `/store` page (no page or
/// script of the platform's involved): typed into the form in Chromium, posted by the page's own
/// script, fetched back with a credential ticket; the secret is not shown back and leaves the
/// page; the ticket leaves the address bar; a replayed and a forged link each show a clear error.
#[tokio::test]
async fn the_keyholders_own_store_page_stores_in_a_real_browser() {
    let Some((chromium, chromedriver)) = find_browser() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI: /usr/bin/chromium or /usr/bin/chromedriver is missing (.ci/run installs chromium and chromium-driver)");
        }
        eprintln!("SKIPPED store page browser test: Chromium not found (apt-get install -y chromium chromium-driver).");
        return;
    };
    const PASTED: &str = "ghp_PastedIntoTheKeyholdersPage_9d3a";
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut kh = Keyholder::start_with(|c| {
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        kh.bind().await;
        let browser = Browser::start(&chromium, &chromedriver).await.unwrap();

        let ticket = kh.ticket(Purpose::Store, "github");
        let link = reqwest::Url::parse_with_params(
            &kh.url(PATH_STORE_PAGE),
            &[("ticket", ticket.as_str()), ("service", "github")],
        )
        .unwrap();
        let headers = reqwest::get(link.clone()).await.unwrap();
        let csp = headers.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert_eq!(headers.headers()["x-frame-options"], "DENY");

        browser.goto(link.as_str()).await.unwrap();
        fill_and_submit(&browser, PASTED, "oauth", "scope=repo\nlogin=octocat").await;
        let out = store_outcome(&browser).await;
        assert_eq!(out["state"], "ok", "{}", out["result"]);
        assert!(out["result"].as_str().unwrap().contains("github"), "{}", out["result"]);
        let meta: Value = serde_json::from_str(out["meta"].as_str().unwrap()).unwrap();
        assert_eq!(meta["scope"], "repo", "{meta}");
        assert_eq!(meta["login"], "octocat", "{meta}");
        assert_eq!(out["secretBox"], "", "the secret left the page");
        assert!(!out["html"].as_str().unwrap().contains(PASTED), "the secret is not shown back");
        assert_eq!(out["href"], Value::from(kh.url(PATH_STORE_PAGE)), "the ticket left the address bar");
        let png = browser.screenshot().await.unwrap();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("store-page.png"), &png).unwrap();

        // Through a credential ticket, as an agent: it was stored.
        let token = kh.credential("github").await.json();
        assert_eq!(token["token"]["accessToken"], PASTED, "{token}");
        assert_eq!(token["token"]["scope"], "repo", "{token}");

        // The same link again: the page opens (it does not spend tickets), the store is refused
        // as a replay and says so; nothing is overwritten.
        browser.goto(link.as_str()).await.unwrap();
        fill_and_submit(&browser, "ghp_second_attempt", "", "").await;
        let out = store_outcome(&browser).await;
        assert_eq!(out["state"], "error", "{out}");
        assert!(out["result"].as_str().unwrap().contains("ticket_invalid"), "{}", out["result"]);
        assert_eq!(out["secretBox"], "");
        assert_eq!(kh.credential("github").await.json()["token"]["accessToken"], PASTED);

        // A forged link shows a clear error and no form.
        let forged = keyholder_protocol::ticket::encode_ticket(&HmacSecret::generate(), &kh.claims(Purpose::Store, "github"));
        let link = reqwest::Url::parse_with_params(
            &kh.url(PATH_STORE_PAGE),
            &[("ticket", forged.as_str()), ("service", "github")],
        )
        .unwrap();
        browser.goto(link.as_str()).await.unwrap();
        let page = browser
            .execute(
                "const e = document.getElementById('error'); \
                 return { code: e && e.dataset.code, text: e && e.textContent, form: !!document.getElementById('store-form') };",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(page["code"], "ticket_invalid", "{page}");
        assert!(page["text"].as_str().unwrap().contains("cannot be used"), "{page}");
        assert_eq!(page["form"], false, "{page}");

        // A hostile platform page frames the store page (to overlay it, or to watch what is typed):
        // Chromium refuses to render it (frame-ancestors 'none', X-Frame-Options DENY), so the
        // page's script is never even fetched.
        let metrics_url = kh.server.as_ref().unwrap().metrics_url().unwrap();
        let script_fetches = || async {
            let text = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
            let line = format!(
                "keyholder_http_requests_total{{route=\"{PATH_STORE_PAGE_SCRIPT}\",method=\"GET\",status=\"200\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map_or(0, |n| n.trim().parse::<u64>().unwrap())
        };
        let fetched = script_fetches().await;
        assert_eq!(fetched, 2, "the page loaded its script twice above");
        let (platform, platform_handle) = start_platform_page();
        browser.goto(&format!("{platform}/")).await.unwrap();
        let framed_ticket = kh.ticket(Purpose::Store, "github");
        let framed = reqwest::Url::parse_with_params(
            &kh.url(PATH_STORE_PAGE),
            &[("ticket", framed_ticket.as_str()), ("service", "github")],
        )
        .unwrap();
        let out = browser
            .execute_async(
                "const [src, done] = arguments; const f = document.createElement('iframe'); \
                 f.onload = () => done('loaded'); setTimeout(() => done('timeout'), 3000); \
                 f.src = src; document.body.appendChild(f);",
                vec![json!(framed.as_str())],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(script_fetches().await, fetched, "the framed page ran ({out})");
        platform_handle.stop(false).await;

        browser.quit().await;
        kh.stop().await;
    })
    .await
    .expect("browser test finished in time");
}
