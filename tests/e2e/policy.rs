//! Custody policies (issue 19): the owner's rules refuse what a hostile platform's valid tickets
//! ask for. Each rule refuses and allows as stated, rules and policies are AND'd, a refused or
//! failed use burns no count, counts survive a restart, and nothing leaks in a refusal.

use clap::Parser;
use keyholder::cli::policy::{PolicyAction, PolicyArgs, PolicyOutcome, PolicyView};
use keyholder_protocol::paths::*;
use keyholder_protocol::Purpose;
use keyholder_tests::upstream::MockServer;
use keyholder_tests::*;
use serde_json::json;

const TOKEN: &str = "gho_policy_secret_1";

#[derive(Parser)]
struct PolicyCli {
    #[command(subcommand)]
    action: PolicyAction,
}

/// `keyholder policy LINE --data-dir ...`, LINE split at white space.
pub(crate) async fn policy(kh: &Keyholder, line: &str) -> anyhow::Result<PolicyOutcome> {
    policy_args(kh, &line.split_whitespace().collect::<Vec<_>>()).await
}

/// `keyholder policy ARGS --data-dir ...`, as the owner runs it.
async fn policy_args(kh: &Keyholder, args: &[&str]) -> anyhow::Result<PolicyOutcome> {
    kh.owner_command("policy", args, |argv| {
        let parsed = PolicyCli::try_parse_from(&argv)?;
        keyholder::cli::policy::run(&PolicyArgs {
            action: parsed.action,
        })
    })
    .await
}

async fn show(kh: &Keyholder, name: &str) -> PolicyView {
    match policy_args(kh, &["show", name, "--json"]).await.unwrap() {
        PolicyOutcome::Views(mut views, true) => views.remove(0),
        _ => panic!("show prints views"),
    }
}

async fn keyholder() -> Keyholder {
    let mut kh = Keyholder::start_with(|c| {
        c.egress_allow_private = true;
        c.enable_tv_refresh = true;
    })
    .await;
    kh.bind().await;
    assert_eq!(
        kh.store(
            "github",
            json!({"accessToken": TOKEN, "refreshToken": "ghr_policy_refresh"})
        )
        .await
        .status,
        200
    );
    kh
}

fn with_agent(kh: &Keyholder, purpose: Purpose, service: &str, aid: Option<&str>) -> String {
    let mut claims = kh.claims(purpose, service);
    claims.aid = aid.map(str::to_string);
    kh.ticket_from(&claims)
}

async fn credential_as(kh: &Keyholder, aid: Option<&str>) -> Answer {
    let ticket = with_agent(kh, Purpose::AgentCredential, "github", aid);
    kh.credential_with(&ticket, "github").await
}

fn assert_refused(answer: &Answer, status: u16, code: &str, rule_text: &str) {
    answer.assert_error(status, code);
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains(rule_text),
        "{text}"
    );
    assert!(
        !text.contains(TOKEN) && !text.contains("ghr_policy"),
        "{text}"
    );
}

#[tokio::test]
async fn inject_only_refuses_every_hand_out_path_while_the_proxy_still_injects() {
    let kh = keyholder().await;
    assert_eq!(
        kh.store(
            "bank",
            json!({"tokenType":"TOTP","totpSecret":"JBSWY3DPEHPK3PXP"})
        )
        .await
        .status,
        200
    );
    policy(&kh, "create proxy-only --delivery inject-only")
        .await
        .unwrap();
    policy(&kh, "attach proxy-only --service github")
        .await
        .unwrap();
    policy(&kh, "attach proxy-only --service bank")
        .await
        .unwrap();

    // A valid agent_credential ticket (as a compromised platform mints) is refused.
    assert_refused(
        &kh.credential("github").await,
        403,
        "policy_denied",
        "inject-only",
    );
    // So is user_reveal, a TOTP code, and tv-refresh get (the refresh token).
    let reveal = kh.ticket(Purpose::UserReveal, "github");
    assert_refused(
        &kh.credential_with(&reveal, "github").await,
        403,
        "policy_denied",
        "inject-only",
    );
    let totp = kh.ticket(Purpose::TotpCode, "bank");
    let url = reqwest::Url::parse_with_params(
        &kh.url(PATH_TOTP_CODE),
        &[("ticket", totp.as_str()), ("service", "bank")],
    )
    .unwrap();
    let code = read(kh.http.get(url).send().await.unwrap()).await;
    assert_refused(&code, 403, "policy_denied", "inject-only");
    assert!(code.json().get("code").is_none());
    let got = kh
        .signed(PATH_REFRESH, &json!({"action": "get", "service": "github"}))
        .await;
    assert_refused(&got, 403, "policy_denied", "inject-only");

    // The proxy still injects it (to an origin the owner allowed).
    let upstream = MockServer::ok().await;
    kh.egress("allow", "github", &["127.0.0.1"], false).await;
    let proxied = kh.proxy_get("github", &upstream.url("/user")).await;
    proxied.assert_ok();
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // The platform's storage list names the policy on the token's meta (nothing more), and a
    // name the platform writes there itself is not shown.
    let meta_of = |list: serde_json::Value, key: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == key)
            .unwrap()["meta"]
            .clone()
    };
    let list = kh
        .storage(json!({"operation": "list", "collection": "tokens"}))
        .await
        .json();
    assert_eq!(
        meta_of(list.clone(), "github")["keyholderPolicies"],
        json!(["proxy-only"])
    );
    assert!(!list.to_string().contains("inject-only"));
    let forged = kh
        .storage(
            json!({"operation": "set", "collection": "tokens", "key": "forged",
                        "data": {"meta": {"keyholderPolicies": ["owner-approved"]}}}),
        )
        .await;
    forged.assert_ok();
    let list = kh
        .storage(json!({"operation": "list", "collection": "tokens"}))
        .await
        .json();
    assert!(meta_of(list, "forged").get("keyholderPolicies").is_none());

    // Detached: handed out again (within the owner generation, no restart).
    policy(&kh, "detach proxy-only --service github")
        .await
        .unwrap();
    assert_eq!(kh.credential("github").await.status, 200);
    let list = kh
        .storage(json!({"operation": "list", "collection": "tokens"}))
        .await
        .json();
    assert!(meta_of(list, "github").get("keyholderPolicies").is_none());

    // Every decision is in the signed audit trail by policy and rule, and in the metrics.
    let entries = kh.audit_entries(Some("github")).await;
    let results: Vec<&str> = entries.iter().map(|e| e.event.result.as_str()).collect();
    assert!(
        results.contains(&"policy_denied rule=delivery policy=proxy-only"),
        "{results:?}"
    );
    assert!(results.contains(&"ok policy=proxy-only"), "{results:?}");
    let metrics = kh.server.as_ref().unwrap().state.metrics.encode();
    assert!(
        metrics
            .contains(r#"keyholder_policy_decisions_total{rule="delivery",outcome="refused"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"keyholder_policy_decisions_total{rule="none",outcome="allowed"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn agents_and_client_ip_rules_refuse_and_allow_and_are_anded() {
    let kh = keyholder().await;
    policy(
        &kh,
        "create agents --agents agent_a,agent_b --client-ip 10.0.0.0/8",
    )
    .await
    .unwrap();
    policy(&kh, "attach agents --service github").await.unwrap();
    // Listed agent, but from an address outside the list: refused by client-ip.
    assert_refused(
        &credential_as(&kh, Some("agent_a")).await,
        403,
        "policy_denied",
        "client address not allowed (10.0.0.0/8)",
    );
    policy(&kh, "update agents --client-ip 10.0.0.0/8,127.0.0.0/8")
        .await
        .unwrap();
    assert_eq!(credential_as(&kh, Some("agent_a")).await.status, 200);
    assert_eq!(credential_as(&kh, Some("agent_b")).await.status, 200);
    // An agent not listed, or a ticket without an aid: refused.
    assert_refused(
        &credential_as(&kh, Some("agent_evil")).await,
        403,
        "policy_denied",
        "agent is not allowed",
    );
    assert_refused(
        &credential_as(&kh, None).await,
        403,
        "policy_denied",
        "agent is not allowed",
    );

    // A second policy, attached to agent_b only: AND'd with the first.
    policy(&kh, "create b-proxy-only --delivery inject-only")
        .await
        .unwrap();
    policy(&kh, "attach b-proxy-only --agent agent_b")
        .await
        .unwrap();
    assert_refused(
        &credential_as(&kh, Some("agent_b")).await,
        403,
        "policy_denied",
        "policy 'b-proxy-only'",
    );
    assert_eq!(credential_as(&kh, Some("agent_a")).await.status, 200);

    // A policy on a proxy config id applies to proxy tickets naming it (the platform's address).
    policy(&kh, "create office-net --client-ip 192.0.2.0/24")
        .await
        .unwrap();
    policy(&kh, "attach office-net --proxy pcfg_1")
        .await
        .unwrap();
    let upstream = MockServer::ok().await;
    let mut claims = kh.claims(Purpose::Proxy, "github");
    claims.aid = Some("agent_a".into());
    claims.pid = Some("pcfg_1".into());
    let ticket = kh.ticket_from(&claims);
    let refused = kh
        .signed(
            PATH_PROXY,
            &json!({"ticket": ticket, "service": "github",
                    "upstream": {"url": upstream.url("/x"), "method": "GET"},
                    "headerTemplates": {"Authorization": "Bearer ${TOKEN}"}}),
        )
        .await;
    assert_refused(&refused, 403, "policy_denied", "policy 'office-net'");
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");

    // Deleting a policy lifts it.
    policy(&kh, "delete agents").await.unwrap();
    assert_eq!(credential_as(&kh, None).await.status, 200);
    assert!(policy(&kh, "show agents").await.is_err());
}

/// The weekday names of today and of every other day in `zone`.
fn today_and_others(zone: &str) -> (String, String) {
    const NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let tz = jiff::tz::db().get(zone).unwrap();
    let today = jiff::Timestamp::now()
        .to_zoned(tz)
        .weekday()
        .to_monday_zero_offset() as usize;
    (
        NAMES[today].to_string(),
        format!("{}-{}", NAMES[(today + 1) % 7], NAMES[(today + 6) % 7]),
    )
}

#[tokio::test]
async fn hours_follow_the_owners_time_zone() {
    let kh = keyholder().await;
    // Kiritimati is UTC+14: its weekday differs from UTC's for ten hours a day.
    let zone = "Pacific/Kiritimati";
    let (_, others) = today_and_others(zone);
    let window = format!("{others} 00:00-24:00");
    policy_args(
        &kh,
        &["create", "office", "--hours", &window, "--time-zone", zone],
    )
    .await
    .unwrap();
    policy(&kh, "attach office --service github").await.unwrap();
    let refused = kh.credential("github").await;
    assert_refused(
        &refused,
        403,
        "policy_denied",
        &format!("outside allowed hours ({window} {zone})"),
    );
    // A second window that includes today (several windows: any one of them).
    let (today, _) = today_and_others(zone);
    let today_window = format!("{today} 00:00-24:00");
    policy_args(
        &kh,
        &[
            "update",
            "office",
            "--hours",
            &window,
            "--hours",
            &today_window,
        ],
    )
    .await
    .unwrap();
    assert_eq!(kh.credential("github").await.status, 200);
    // An unknown zone is refused by the CLI, with the flag named.
    let err = policy(&kh, "update office --time-zone Mars/Olympus")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--time-zone"), "{err}");
}

#[tokio::test]
async fn a_rate_answers_429_with_retry_after_per_target() {
    let kh = keyholder().await;
    assert_eq!(
        kh.store("gitlab", json!({"accessToken": "glpat_x"}))
            .await
            .status,
        200
    );
    policy(&kh, "create slow --rate 2/min").await.unwrap();
    policy(&kh, "attach slow --service github").await.unwrap();
    policy(&kh, "attach slow --service gitlab").await.unwrap();
    assert_eq!(kh.credential("github").await.status, 200);
    assert_eq!(kh.credential("github").await.status, 200);
    let limited = kh.credential("github").await;
    assert_refused(&limited, 429, "rate_limited", "rate limit (2/min)");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    // Per target: the other service has its own bucket.
    assert_eq!(kh.credential("gitlab").await.status, 200);
}

#[tokio::test]
async fn usage_caps_count_successful_uses_only_and_survive_a_restart() {
    let mut kh = keyholder().await;
    policy(&kh, "create cap --max-uses 3 --per total")
        .await
        .unwrap();
    policy(&kh, "create agents --agents agent_a").await.unwrap();
    for name in ["cap", "agents"] {
        policy(&kh, &format!("attach {name} --service github"))
            .await
            .unwrap();
    }
    policy(&kh, "attach cap --service missing").await.unwrap();
    // Refused by another policy: no count burnt.
    for _ in 0..5 {
        credential_as(&kh, Some("agent_x"))
            .await
            .assert_error(403, "policy_denied");
    }
    // A use that fails after admission (nothing stored) gives its count back.
    for _ in 0..5 {
        kh.credential("missing")
            .await
            .assert_error(404, "token_not_found");
    }
    assert_eq!(credential_as(&kh, Some("agent_a")).await.status, 200);
    assert_eq!(credential_as(&kh, Some("agent_a")).await.status, 200);
    let view = show(&kh, "cap").await;
    assert_eq!(view.usage.len(), 2, "{:?}", view.usage);
    let github = view
        .usage
        .iter()
        .find(|u| u.target == "service:github")
        .unwrap();
    assert_eq!((github.period.as_str(), github.count), ("total", 2));
    let missing = view
        .usage
        .iter()
        .find(|u| u.target == "service:missing")
        .unwrap();
    assert_eq!(missing.count, 0);

    // A restart keeps the count: one use left.
    kh.restart().await;
    assert_eq!(credential_as(&kh, Some("agent_a")).await.status, 200);
    let capped = credential_as(&kh, Some("agent_a")).await;
    assert_refused(
        &capped,
        429,
        "rate_limited",
        "usage cap reached (3 uses in total)",
    );
    assert!(capped.header("retry-after").is_some());

    // `keyholder status` shows the policies, attachments and counts.
    let args = keyholder::cli::data_folder::OwnerArgs {
        data: kh.data_args(),
        json: true,
    };
    let status = tokio::task::spawn_blocking(move || keyholder::cli::status::status(&args))
        .await
        .unwrap()
        .unwrap();
    let cap = status
        .policies
        .iter()
        .find(|p| p.policy.name == "cap")
        .unwrap();
    assert_eq!(cap.attachments.len(), 2);
    assert!(cap
        .usage
        .iter()
        .any(|u| u.target == "service:github" && u.count == 3));

    // A daily cap counts per local day.
    policy(
        &kh,
        "create daily --max-uses 1 --per day --time-zone Europe/Berlin",
    )
    .await
    .unwrap();
    assert_eq!(
        kh.store("daily-svc", json!({"accessToken": "x"}))
            .await
            .status,
        200
    );
    policy(&kh, "attach daily --service daily-svc")
        .await
        .unwrap();
    assert_eq!(kh.credential("daily-svc").await.status, 200);
    let daily = kh.credential("daily-svc").await;
    assert_refused(&daily, 429, "rate_limited", "1 uses per day");
    let retry: u64 = daily.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=25 * 3600).contains(&retry), "{retry}");
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::db().get("Europe/Berlin").unwrap())
        .date()
        .to_string();
    assert_eq!(show(&kh, "daily").await.usage[0].period, today);
}

#[tokio::test]
async fn the_cli_refuses_bad_rules_and_names_the_flag() {
    let kh = keyholder().await;
    for (args, flag) in [
        (
            vec!["create", "p", "--hours", "Mon-Fri 18:00-08:00"],
            "--hours",
        ),
        (vec!["create", "p", "--rate", "5/day"], "--rate"),
        (
            vec!["create", "p", "--client-ip", "300.0.0.1"],
            "--client-ip",
        ),
        (vec!["create", "p", "--delivery", "sometimes"], "--delivery"),
        (vec!["create", "p", "--max-uses", "0"], "--max-uses"),
        (vec!["create", "bad name"], "policy name"),
    ] {
        let err = policy_args(&kh, &args).await.err().unwrap().to_string();
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    policy(&kh, "create p").await.unwrap();
    assert!(policy(&kh, "create p").await.is_err(), "exists already");
    assert!(policy(&kh, "attach nope --service github").await.is_err());
    // Exactly one target.
    assert!(policy(&kh, "attach p").await.is_err());
    assert!(policy(&kh, "attach p --service a --agent b").await.is_err());
    match policy(&kh, "list --json").await.unwrap() {
        PolicyOutcome::Views(views, true) => assert_eq!(views.len(), 1),
        _ => panic!("list prints views"),
    }
}

async fn pending(kh: &Keyholder) -> Vec<keyholder::policy::approvals::PendingApproval> {
    let args = keyholder::cli::approvals::ApprovalsArgs {
        data: kh.data_args(),
        json: true,
    };
    tokio::task::spawn_blocking(move || keyholder::cli::approvals::approvals(&args))
        .await
        .unwrap()
        .unwrap()
}

/// `keyholder approve|deny ID`; the server is left to pick it up by itself.
async fn decide(kh: &Keyholder, id: &str, approve: bool) -> anyhow::Result<String> {
    let args = keyholder::cli::approvals::DecideArgs {
        data: kh.data_args(),
        id: id.to_string(),
    };
    tokio::task::spawn_blocking(move || keyholder::cli::approvals::decide(&args, approve))
        .await
        .unwrap()
}

/// Waits for exactly one held use and returns it.
async fn held(kh: &Keyholder) -> keyholder::policy::approvals::PendingApproval {
    for _ in 0..200 {
        let mut list = pending(kh).await;
        if !list.is_empty() {
            assert_eq!(list.len(), 1, "{list:?}");
            return list.remove(0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no use was held for approval");
}

#[tokio::test]
async fn approval_holds_each_use_until_the_owner_decides_and_a_timeout_denies() {
    let kh = keyholder().await;
    policy(&kh, "create prod --approval --approval-timeout 20")
        .await
        .unwrap();
    policy(&kh, "attach prod --service github").await.unwrap();

    // Approved with the CLI: the held request answers with the credential.
    let owner = async {
        let p = held(&kh).await;
        assert_eq!(
            (
                p.service.as_str(),
                p.agent.as_str(),
                p.client.as_str(),
                p.endpoint.as_str(),
                p.policy.as_str()
            ),
            ("github", "agent_a", "127.0.0.1", PATH_CREDENTIAL, "prod")
        );
        assert!(p.expires_at - p.created_at == 20);
        let decided_at = std::time::Instant::now();
        decide(&kh, &p.id, true).await.unwrap();
        // One-time: the same id cannot be decided again.
        assert!(decide(&kh, &p.id, false).await.is_err());
        decided_at
    };
    let (answer, decided_at) = tokio::join!(credential_as(&kh, Some("agent_a")), owner);
    answer.assert_ok();
    assert_eq!(answer.json()["token"]["accessToken"], TOKEN);
    // The running server followed the owner's decision by itself, within a second.
    // (Its poll is every quarter second; the bound leaves room for a loaded test machine.)
    assert!(decided_at.elapsed() < std::time::Duration::from_secs(2));

    // Denied: refused, nothing decrypted into the answer.
    let owner = async {
        let p = held(&kh).await;
        decide(&kh, &p.id, false).await.unwrap();
    };
    let (answer, ()) = tokio::join!(kh.credential("github"), owner);
    assert_refused(&answer, 403, "policy_denied", "the owner denied this use");

    // No decision in time: denied, and the stale id can no longer be approved.
    policy(&kh, "update prod --approval-timeout 1")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = kh.credential("github").await;
    assert_refused(
        &answer,
        403,
        "policy_denied",
        "no approval from the owner within 1 s",
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert!(pending(&kh).await.is_empty());
    // The held use was closed as timed out; its id can no longer be decided.
    let db = rusqlite::Connection::open(kh.data_dir.join("keyholder.db")).unwrap();
    let mut rows: Vec<(String, String)> = db
        .prepare("SELECT decision, id FROM policy_approvals ORDER BY decision")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let decisions: Vec<&str> = rows.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(decisions, ["approved", "denied", "timeout"]);
    let id = rows.pop().unwrap().1;
    assert!(decide(&kh, &id, true).await.is_err());
    assert!(decide(&kh, "apr_0000000000000000", true).await.is_err());

    // The trail says who decided.
    let entries = kh.audit_entries(Some("github")).await;
    let results: Vec<&str> = entries.iter().map(|e| e.event.result.as_str()).collect();
    assert!(
        results.contains(&"ok policy=prod approved-by=owner"),
        "{results:?}"
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == "policy_denied rule=approval policy=prod")
            .count(),
        2,
        "{results:?}"
    );
}

/// The notified approval link (its JSON checked on the way), rewritten from the public URL to
/// where this test server listens.
async fn notified_link(kh: &Keyholder, receiver: &MockServer, nth: usize) -> (String, String) {
    for _ in 0..250 {
        let approvals: Vec<serde_json::Value> = receiver
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter(|v| v["keyholder"]["event"] == "approval")
            .collect();
        if let Some(n) = approvals.get(nth) {
            assert_eq!(n["topic"], "keyholder-owner");
            assert!(n["title"].as_str().unwrap().contains("github"), "{n}");
            assert_eq!(n["keyholder"]["service"], "github");
            assert_eq!(n["keyholder"]["agent"], "agent_a");
            let link = n["click"].as_str().unwrap().to_string();
            assert_eq!(n["actions"][0]["url"], json!(link));
            assert!(
                link.starts_with(&format!("{PUBLIC_URL}/approval?id=apr_")),
                "{link}"
            );
            assert!(!n.to_string().contains(TOKEN));
            let id = n["keyholder"]["id"].as_str().unwrap().to_string();
            return (link.replace(PUBLIC_URL, &kh.base), id);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no approval notification reached the receiver");
}

async fn page_text(browser: &keyholder_tests::webdriver::Browser, id: &str) -> String {
    for _ in 0..250 {
        let text = browser
            .execute(
                "const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                vec![json!(id)],
            )
            .await
            .unwrap();
        if let Some(text) = text.as_str() {
            return text.to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("#{id} never appeared");
}

/// The approval flow through the notified link in headless Chromium: a receiver on 127.0.0.1
/// gets the ntfy-compatible JSON; opening the link (GET) decides nothing; a forged token or a
/// cross-site POST is refused; the page's Approve button releases the held request, Deny refuses
/// it (and the refusal is notified too); a used link is dead.
#[tokio::test]
async fn approval_through_the_notified_link_in_a_real_browser() {
    use keyholder_tests::webdriver::{find_browser, Browser};
    let Some((chromium, chromedriver)) = find_browser() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI: /usr/bin/chromium or /usr/bin/chromedriver is missing");
        }
        eprintln!("SKIPPED approval browser test: Chromium not found (apt-get install -y chromium chromium-driver).");
        return;
    };
    let receiver = MockServer::ok().await;
    let notify_url = receiver.url("/keyholder-owner");
    let mut kh = Keyholder::start_with(|c| {
        c.notify_url = Some(notify_url);
        c.notify_on = keyholder::policy::notify::NotifyOn::All;
    })
    .await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": TOKEN})).await;
    policy(&kh, "create prod --approval --approval-timeout 60")
        .await
        .unwrap();
    policy(&kh, "attach prod --service github").await.unwrap();
    let browser = Browser::start(&chromium, &chromedriver).await.unwrap();

    let owner = async {
        let (link, id) = notified_link(&kh, &receiver, 0).await;
        // A GET shows the page and decides nothing.
        let shown = reqwest::get(&link).await.unwrap();
        assert_eq!(shown.status(), 200);
        let csp = shown.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("form-action 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(shown.headers()["referrer-policy"], "no-referrer");
        assert!(shown.text().await.unwrap().contains("Approve"));
        assert_eq!(pending(&kh).await.len(), 1);
        // A forged token shows nothing; a cross-site POST with the right token decides nothing.
        let forged = reqwest::get(format!("{}/approval?id={id}&t=forged", kh.base))
            .await
            .unwrap();
        assert_eq!(forged.status(), 404);
        let token = url::Url::parse(&link)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "t")
            .unwrap()
            .1
            .into_owned();
        let cross = kh
            .http
            .post(kh.url("/approval"))
            .header("sec-fetch-site", "cross-site")
            .form(&[("id", id.as_str()), ("t", &token), ("decision", "approve")])
            .send()
            .await
            .unwrap();
        assert_eq!(cross.status(), 403);
        let wrong = kh
            .http
            .post(kh.url("/approval"))
            .form(&[("id", id.as_str()), ("t", "x"), ("decision", "approve")])
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 404);
        assert_eq!(pending(&kh).await.len(), 1);
        // The owner opens the link in the browser and clicks Approve.
        browser.goto(&link).await.unwrap();
        assert_eq!(page_text(&browser, "service").await, "github");
        assert_eq!(page_text(&browser, "agent").await, "agent_a");
        let approve = browser.find("#approve").await.unwrap();
        browser.click(&approve).await.unwrap();
        assert!(page_text(&browser, "outcome").await.starts_with("Approved"));
        link
    };
    let (answer, used_link) = tokio::join!(credential_as(&kh, Some("agent_a")), owner);
    answer.assert_ok();
    assert_eq!(answer.json()["token"]["accessToken"], TOKEN);
    // The link is one-time.
    assert_eq!(reqwest::get(&used_link).await.unwrap().status(), 404);

    // Denied from the page: refused, and the refusal is notified.
    let owner = async {
        let (link, _) = notified_link(&kh, &receiver, 1).await;
        browser.goto(&link).await.unwrap();
        let deny = browser.find("#deny").await.unwrap();
        browser.click(&deny).await.unwrap();
        assert!(page_text(&browser, "outcome").await.starts_with("Denied"));
    };
    let (answer, ()) = tokio::join!(credential_as(&kh, Some("agent_a")), owner);
    assert_refused(&answer, 403, "policy_denied", "the owner denied this use");
    let mut refusal = None;
    for _ in 0..250 {
        refusal = receiver
            .requests()
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .find(|v| v["keyholder"]["event"] == "refusal");
        if refusal.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let refusal = refusal.expect("refusal notified");
    assert_eq!(refusal["keyholder"]["rule"], "approval");
    assert_eq!(refusal["keyholder"]["policy"], "prod");
    drop(browser);
    kh.stop().await;
}

#[tokio::test]
async fn refusal_notifications_are_rate_limited_so_a_flood_cannot_spam_the_owner() {
    let receiver = MockServer::ok().await;
    let notify_url = receiver.url("/owner");
    let mut kh = Keyholder::start_with(|c| {
        c.notify_url = Some(notify_url);
        c.notify_on = keyholder::policy::notify::NotifyOn::Refusals;
    })
    .await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": TOKEN})).await;
    policy(&kh, "create agents --agents agent_a").await.unwrap();
    policy(&kh, "attach agents --service github").await.unwrap();
    for _ in 0..40 {
        credential_as(&kh, Some("agent_flood"))
            .await
            .assert_error(403, "policy_denied");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let sent: Vec<serde_json::Value> = receiver
        .requests()
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .collect();
    assert_eq!(sent.len(), 10, "a burst of 10, then at most 10 a minute");
    assert!(sent.iter().all(|n| n["keyholder"]["rule"] == "agents"
        && n["topic"] == "owner"
        && !n.to_string().contains("agent_flood")));
    kh.stop().await;
}

/// `--geo` with an owner-provided MaxMind-format database (built here by the tests' own writer):
/// loopback maps to DE, so `--geo DE` allows, `--geo FR,NL` refuses, and an address the
/// database does not know is refused too (as it is when no database is configured).
#[tokio::test]
async fn geo_rules_read_the_owners_country_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("countries.mmdb");
    std::fs::write(
        &db,
        keyholder_tests::mmdb::country_db(&[
            ("127.0.0.0".parse().unwrap(), 8, "DE"),
            ("10.0.0.0".parse().unwrap(), 8, "FR"),
        ]),
    )
    .unwrap();
    let mut kh = Keyholder::start_with(|c| c.geoip_db = Some(db.clone())).await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": TOKEN})).await;
    policy(&kh, "create eu --geo fr,nl").await.unwrap();
    policy(&kh, "attach eu --service github").await.unwrap();
    assert_refused(
        &kh.credential("github").await,
        403,
        "policy_denied",
        "client country not allowed (FR,NL)",
    );
    policy(&kh, "update eu --geo DE,FR").await.unwrap();
    assert_eq!(kh.credential("github").await.status, 200);
    kh.stop().await;

    // Loopback not in the database: unknown country, refused.
    std::fs::write(
        &db,
        keyholder_tests::mmdb::country_db(&[("10.0.0.0".parse().unwrap(), 8, "DE")]),
    )
    .unwrap();
    kh.restart().await;
    kh.credential("github")
        .await
        .assert_error(403, "policy_denied");
    // Without a database nothing can be shown to be in an allowed country.
    kh.stop().await;
    kh.config.geoip_db = None;
    kh.restart().await;
    kh.credential("github")
        .await
        .assert_error(403, "policy_denied");
    assert!(policy(&kh, "update eu --geo Germany").await.is_err());
}

fn names(views: &[PolicyView]) -> Vec<(String, String)> {
    views
        .iter()
        .map(|v| (v.policy.name.clone(), v.policy.source.clone()))
        .collect()
}

async fn list(kh: &Keyholder) -> Vec<PolicyView> {
    match policy(kh, "list --json").await.unwrap() {
        PolicyOutcome::Views(views, true) => views,
        _ => panic!("list prints views"),
    }
}

#[tokio::test]
async fn a_policy_file_declares_policies_that_the_cli_shows_and_does_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.toml");
    std::fs::write(
        &file,
        r#"
[[policy]]
name = "gh-proxy"
delivery = "inject-only"
attach = { services = ["github"] }

[[policy]]
name = "office"
agents = ["agent_a"]
hours = ["Mon-Sun 00:00-24:00"]
time-zone = "Europe/Berlin"
max-uses = 100
per = "day"
attach = { services = ["gitlab"] }
"#,
    )
    .unwrap();
    let path = file.clone();
    let mut kh = Keyholder::start_with(move |c| c.policy_file = Some(path)).await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": TOKEN})).await;
    kh.store("gitlab", json!({"accessToken": "glpat_file"}))
        .await;
    assert_refused(
        &kh.credential("github").await,
        403,
        "policy_denied",
        "inject-only",
    );
    let gitlab = with_agent(&kh, Purpose::AgentCredential, "gitlab", Some("agent_a"));
    assert_eq!(kh.credential_with(&gitlab, "gitlab").await.status, 200);
    let views = list(&kh).await;
    assert_eq!(
        names(&views),
        vec![
            ("gh-proxy".to_string(), "file".to_string()),
            ("office".to_string(), "file".to_string())
        ]
    );
    assert_eq!(views[0].attachments[0].source, "file");
    assert!(views[0].lines()[0].contains("from the policy file"));
    // The CLI shows them but does not change them.
    for args in [
        vec!["update", "gh-proxy", "--rate", "1/s"],
        vec!["delete", "gh-proxy"],
        vec!["detach", "gh-proxy", "--service", "github"],
    ] {
        let err = policy_args(&kh, &args).await.err().unwrap().to_string();
        assert!(err.contains("policy file"), "{args:?}: {err}");
    }
    policy(&kh, "create extra --rate 100/s").await.unwrap();

    // The next start applies the edited file: gone from the file, gone; CLI policies stay.
    std::fs::write(
        &file,
        "[[policy]]\nname = \"office\"\nagents = [\"agent_b\"]\nattach = { services = [\"gitlab\"] }\n",
    )
    .unwrap();
    kh.restart().await;
    assert_eq!(kh.credential("github").await.status, 200);
    kh.credential_with(
        &with_agent(&kh, Purpose::AgentCredential, "gitlab", Some("agent_a")),
        "gitlab",
    )
    .await
    .assert_error(403, "policy_denied");
    assert_eq!(
        names(&list(&kh).await),
        vec![
            ("extra".to_string(), "cli".to_string()),
            ("office".to_string(), "file".to_string())
        ]
    );
    kh.stop().await;

    // A name used by the CLI and the file, or a bad file, stops the start with the file named.
    for (text, expected) in [
        ("[[policy]]\nname = \"extra\"\n", "also made with the CLI"),
        (
            "[[policy]]\nname = \"x\"\ncolour = \"red\"\n",
            "unknown field",
        ),
        (
            "[[policy]]\nname = \"x\"\nhours = [\"Mon 9-5\"]\n",
            "--hours",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let err = match keyholder::start(kh.config.clone()).await {
            Ok(_) => panic!("started with {text}"),
            Err(err) => format!("{err:#}"),
        };
        assert!(
            err.contains("policies.toml") && err.contains(expected),
            "{err}"
        );
    }
}
