//! Egress control: the SSRF address matrix refused before any connection, origin pinning with
//! `egress_denied` and nothing sent, and the owner's `keyholder egress` commands taking effect at once.

use keyholder_tests::upstream::MockServer;
use keyholder_tests::*;
use serde_json::json;

use crate::proxy::proxy_keyholder;

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
async fn first_successful_call_pins_the_origin() {
    let mut kh = proxy_keyholder(|_| {}).await;
    let a = MockServer::ok().await;
    let b = MockServer::ok().await;

    // A failed first call (nothing listening) does not pin.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    kh.proxy_get("github", &format!("http://{closed}/"))
        .await
        .assert_error(502, "upstream_error");
    assert_eq!(
        kh.egress("show", "github", &[], false).await.pinned_origin,
        None
    );

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
    kh.store("slack", json!({"accessToken": "xoxb-1"})).await;
    assert_eq!(kh.proxy_get("slack", &b.url("/")).await.status, 200);

    // The pin survives a restart.
    kh.restart().await;
    kh.proxy_get("github", &b.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
}

#[tokio::test]
async fn owner_commands_take_effect_at_once() {
    let kh = proxy_keyholder(|_| {}).await;
    let a = MockServer::ok().await;
    let b = MockServer::ok().await;
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
    kh.proxy_get("github", &b.url("/"))
        .await
        .assert_error(403, "egress_denied");

    // Allowing B keeps the pinned A on the list; the running server sees it on the next call.
    let policy = kh.egress("allow", "github", &[&b.origin()], false).await;
    assert_eq!(
        serde_json::to_value(&policy).unwrap()["mode"],
        json!("allowlist")
    );
    assert!(policy.allowlist.contains(&b.origin()));
    assert!(policy.allowlist.contains(&a.origin()));
    assert_eq!(kh.proxy_get("github", &b.url("/")).await.status, 200);
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
    let c = MockServer::ok().await;
    kh.proxy_get("github", &c.url("/"))
        .await
        .assert_error(403, "egress_denied");
    assert_eq!(c.connections(), 0);

    // Host patterns.
    kh.egress("allow", "github", &["localhost"], false).await;
    let by_name = format!("http://localhost:{}/", c.addr.port());
    assert_eq!(kh.proxy_get("github", &by_name).await.status, 200);

    // Reset: pinned again, to whatever succeeds next.
    kh.egress("reset", "github", &[], false).await;
    assert_eq!(kh.proxy_get("github", &c.url("/")).await.status, 200);
    kh.proxy_get("github", &a.url("/"))
        .await
        .assert_error(403, "egress_denied");

    // Any: anywhere the guard allows.
    kh.egress("allow", "github", &[], true).await;
    assert_eq!(kh.proxy_get("github", &a.url("/")).await.status, 200);
    assert_eq!(kh.proxy_get("github", &b.url("/")).await.status, 200);
}
