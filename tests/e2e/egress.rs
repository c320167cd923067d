//! Egress control: the SSRF address matrix refused before any connection, opt-in origin pinning
//! bound to its credential with `egress_denied` and nothing sent, and the owner's `keyholder egress`
//! commands taking effect at once.

use keyholder_tests::upstream::{Fault, FaultyServer, MockServer};
use keyholder_tests::*;
use serde_json::json;

use crate::proxy::{policy_keyholder, proxy_keyholder};

/// Every address form the guard must refuse, pointed at a local listener where a port applies:
/// that listener must see no connection at all.
fn ssrf_matrix(port: u16) -> Vec<String> {
    [
        "https://localhost:{p}/",
        "https://LocalHost:{p}/",
        "https://127.0.0.1:{p}/",
        "https://127.1:{p}/",
        "https://2130706433:{p}/",
        "https://0x7f.0.0.1:{p}/",
        "https://[::1]:{p}/",
        "https://0.0.0.0:{p}/",
        "https://[::]:{p}/",
        "https://[::ffff:127.0.0.1]:{p}/",
        "https://[::ffff:7f00:1]:{p}/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:169.254.169.254]/",
        "https://[fd00:ec2::254]/",
        "https://100.100.100.200/",
        "https://10.0.0.1/",
        "https://172.16.0.1/",
        "https://192.168.1.1/",
        "https://100.64.0.1/",
        "https://[fc00::1]/",
        "https://[fd12:3456::1]/",
        "https://[fe80::1]/",
        "https://224.0.0.1/",
        "https://239.255.255.250/",
        "https://[ff02::1]/",
        "https://255.255.255.255/",
        "http://127.0.0.1:{p}/",
        "ftp://127.0.0.1:{p}/",
        "file:///etc/passwd",
        "https://user:pw@localhost:{p}/",
    ]
    .iter()
    .map(|u| u.replace("{p}", &port.to_string()))
    .collect()
}

#[tokio::test]
async fn ssrf_matrix_is_refused_before_any_connection() {
    // Default configuration: the guard is fully on.
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    kh.store("github", json!({"accessToken": "gho_ssrf"})).await;
    kh.egress("allow", "github", &[], true).await;
    let sink = MockServer::ok().await;
    for url in ssrf_matrix(sink.addr.port()) {
        let a = kh.proxy_get("github", &url).await;
        a.assert_error(403, "egress_denied");
        assert!(!String::from_utf8_lossy(&a.body).contains("gho_ssrf"));
    }
    assert_eq!(sink.connections(), 0, "the guard let a connection through");
    // Nothing got pinned by refused calls.
    assert_eq!(
        kh.egress("show", "github", &[], false).await.pinned_origin,
        None
    );
}

#[tokio::test]
async fn allow_private_still_refuses_metadata_link_local_multicast_and_unspecified() {
    let kh = proxy_keyholder(|_| {}).await;
    kh.egress("allow", "github", &[], true).await;
    let sink = MockServer::ok().await;
    let p = sink.addr.port();
    for url in [
        format!("http://0.0.0.0:{p}/"),
        format!("http://[::]:{p}/"),
        format!("http://[::ffff:0.0.0.0]:{p}/"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fd00:ec2::254]/".to_string(),
        "http://[fe80::1]/".to_string(),
        "http://224.0.0.1/".to_string(),
        "http://[ff02::1]/".to_string(),
    ] {
        kh.proxy_get("github", &url)
            .await
            .assert_error(403, "egress_denied");
    }
    assert_eq!(sink.connections(), 0);
    // Loopback is reachable in this mode, by literal and by name.
    assert_eq!(kh.proxy_get("github", &sink.url("/")).await.status, 200);
    let by_name = format!("http://localhost:{p}/");
    assert_eq!(kh.proxy_get("github", &by_name).await.status, 200);
}

#[tokio::test]
async fn pinned_mode_pins_the_first_origin_and_never_releases_a_sent_pin() {
    let mut kh = policy_keyholder(|_| {}).await;
    // Pinning is an owner opt-in per service now (the default mode is `known`).
    kh.egress_mode("github", "pinned").await;
    let a = MockServer::ok().await;
    let b = MockServer::ok().await;

    // The first upstream reads the request (credential included) and resets without answering:
    // the credential was sent, so the pin stays and nothing else may be pinned afterwards.
    let closer = FaultyServer::start(Fault::Reset).await;
    kh.proxy_get("github", &closer.url("/"))
        .await
        .assert_error(502, "upstream_error");
    let closer_origin = format!("http://{}", closer.addr);
    assert_eq!(
        kh.egress("show", "github", &[], false).await.pinned_origin,
        Some(closer_origin)
    );
    kh.proxy_get("github", &a.url("/steal"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(a.connections(), 0);

    // The owner starts over; the next call pins A.
    kh.egress("reset", "github", &[], false).await;
    kh.egress_mode("github", "pinned").await;
    assert_eq!(kh.proxy_get("github", &a.url("/first")).await.status, 200);
    let policy = kh.egress("show", "github", &[], false).await;
    assert_eq!(policy.pinned_origin, Some(a.origin()));
    assert_eq!(
        kh.proxy_get("github", &a.url("/again?x=1")).await.status,
        200
    );

    // Any other origin: another port, another name for the same host, another scheme.
    for url in [
        b.url("/steal"),
        format!("http://localhost:{}/", a.addr.port()),
        format!("https://127.0.0.1:{}/", a.addr.port()),
    ] {
        kh.proxy_get("github", &url)
            .await
            .assert_error(403, "egress_denied");
    }
    assert_eq!(b.connections(), 0, "nothing may reach a second origin");
    assert_eq!(a.count(), 2);

    // Another service is pinned on its own.
    kh.egress_mode("slack", "pinned").await;
    kh.store("slack", json!({"accessToken": "xoxb-1-local"}))
        .await;
    assert_eq!(kh.proxy_get("slack", &b.url("/")).await.status, 200);

    // The pin survives a restart.
    kh.restart().await;
    kh.proxy_get("github", &b.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
}

#[tokio::test]
async fn a_pin_belongs_to_its_credential() {
    let kh = policy_keyholder(|_| {}).await;
    let owner_api = MockServer::ok().await;
    let attacker = MockServer::ok().await;

    // A service cannot be pinned before its credential exists: nothing sent, nothing pinned.
    kh.egress_mode("later", "pinned").await;
    kh.proxy_get("later", &attacker.url("/"))
        .await
        .assert_error(404, "token_not_found");
    assert_eq!(
        kh.egress("show", "later", &[], false).await.pinned_origin,
        None
    );

    // The platform stores a throwaway credential of its own and pins its host with it.
    kh.egress_mode("github", "pinned").await;
    kh.store("github", json!({"accessToken": "gho_platform_throwaway"}))
        .await;
    assert_eq!(kh.proxy_get("github", &attacker.url("/")).await.status, 200);
    // The owner stores the real credential: the old pin does not apply to it, so the platform's
    // host is not where it goes; its first call pins anew.
    kh.store(
        "github",
        json!({"accessToken": "gho_owner_real_credential"}),
    )
    .await;
    assert_eq!(
        kh.proxy_get("github", &owner_api.url("/")).await.status,
        200
    );
    let pins: Vec<String> = kh
        .egress("show", "github", &[], false)
        .await
        .pins
        .into_iter()
        .map(|p| p.origin)
        .collect();
    assert_eq!(pins.len(), 2, "{pins:?}");
    assert!(pins.contains(&owner_api.origin()) && pins.contains(&attacker.origin()));

    // Deleting the document and writing the same bytes back (storage get/delete/set, as a
    // compromised platform can) does not free the pin: it belongs to the same credential.
    let doc = kh
        .storage(json!({"operation": "get", "collection": "tokens", "key": "github"}))
        .await
        .json()["data"]
        .clone();
    assert!(doc.is_object(), "{doc}");
    assert_eq!(
        kh.storage(json!({"operation": "delete", "collection": "tokens", "key": "github"}))
            .await
            .status,
        200
    );
    kh.proxy_get("github", &attacker.url("/"))
        .await
        .assert_error(404, "token_not_found");
    assert_eq!(
        kh.storage(
            json!({"operation": "set", "collection": "tokens", "key": "github", "data": doc})
        )
        .await
        .status,
        200
    );
    kh.proxy_get("github", &attacker.url("/again"))
        .await
        .assert_error(403, "egress_denied");
    // Nor does writing a throwaway credential in between, pinning the attacker's host with it,
    // then writing the owner's document back: each credential keeps its own pin.
    kh.storage(json!({"operation": "set", "collection": "tokens", "key": "github", "data": {"accessToken": "gho_platform_second"}}))
        .await;
    assert_eq!(kh.proxy_get("github", &attacker.url("/")).await.status, 200);
    kh.storage(json!({"operation": "set", "collection": "tokens", "key": "github", "data": doc}))
        .await;
    kh.proxy_get("github", &attacker.url("/third"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(attacker.count(), 2, "only the throwaway credentials' calls");
    assert!(attacker.requests().iter().all(|r| !r
        .header("authorization")
        .unwrap_or("")
        .contains("gho_owner")));
    assert!(attacker.requests()[0]
        .header("authorization")
        .is_some_and(|a| a.contains("gho_platform_throwaway")));
    assert_eq!(
        kh.proxy_get("github", &owner_api.url("/")).await.status,
        200
    );
}

#[tokio::test]
async fn owner_commands_take_effect_at_once() {
    let kh = policy_keyholder(|_| {}).await;
    let a = MockServer::ok().await;
    let b = MockServer::ok().await;
    // Known mode: a local origin is no GitHub origin.
    let refused = kh.proxy_get("github", &a.url("/")).await;
    refused.assert_error(403, "egress_denied");
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&format!("keyholder egress allow github {}", a.origin())),
        "{message}"
    );
    assert_eq!(a.connections(), 0);

    // Allowing A: the running server sees it on the next call; the pending entry goes.
    let policy = kh.egress("allow", "github", &[&a.origin()], false).await;
    assert_eq!(
        serde_json::to_value(&policy).unwrap()["mode"],
        json!("known")
    );
    assert!(kh.egress_pending().is_empty());
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
    kh.proxy_get("github", &b.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(b.connections(), 0);

    // Host patterns.
    kh.egress("allow", "github", &["localhost"], false).await;
    let by_name = format!("http://localhost:{}/", b.addr.port());
    assert_eq!(kh.proxy_get("github", &by_name).await.status, 200);

    // Allowlist mode keeps the entries and drops the catalogue.
    kh.egress_mode("github", "allowlist").await;
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);

    // Reset: the default again (known, nothing allowed).
    kh.egress("reset", "github", &[], false).await;
    kh.proxy_get("github", &a.url("/"))
        .await
        .assert_error(403, "egress_denied");

    // Any: anywhere the guard allows.
    kh.egress("allow", "github", &[], true).await;
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
    assert_eq!(kh.proxy_get("github", &b.url("/")).await.status, 200);
}

/// One meaning of "origin": the audit entry of a proxied call names its upstream exactly as the
/// egress pin holds it (`scheme://host:port`), so the owner can allow or compare what the trail
/// shows as it is.
#[tokio::test]
async fn the_audit_trail_names_the_upstream_as_the_pin_holds_it() {
    let kh = policy_keyholder(|_| {}).await;
    kh.egress_mode("github", "pinned").await;
    let upstream = MockServer::ok().await;
    let url = upstream
        .url("/repos?per_page=1")
        .replace("127.0.0.1", "LocalHost");
    assert_eq!(kh.proxy_get("github", &url).await.status, 200);
    let pinned = kh
        .egress("show", "github", &[], false)
        .await
        .pinned_origin
        .expect("pinned on first use");
    assert_eq!(pinned, format!("http://localhost:{}", upstream.addr.port()));
    let entries = kh.audit_entries(Some("github")).await;
    let proxied = entries
        .iter()
        .rfind(|e| e.event.endpoint == keyholder_protocol::paths::PATH_PROXY)
        .expect("the proxied call is audited");
    assert_eq!(proxied.event.result, "ok");
    assert_eq!(proxied.event.upstream, pinned);
}
