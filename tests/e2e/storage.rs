//! `/v1/storage`: the platform's metadata operations and the list semantics.

use keyholder_tests::*;
use serde_json::{json, Value};

async fn bound() -> Keyholder {
    let mut kh = Keyholder::start().await;
    kh.bind().await;
    kh
}

#[tokio::test]
async fn set_get_delete_round_trip_and_echo_request_ids() {
    let kh = bound().await;
    let doc = json!({"name": "cfg", "n": 1, "nested": {"a": [1, 2]}});
    let set = kh.storage(json!({"operation":"set","collection":"proxy_configs","key":"p1","data":doc,"requestId":"req_body_1"})).await;
    assert_eq!(set.status, 200);
    assert_eq!(set.json(), json!({"status":"ok","requestId":"req_body_1"}));
    let get = kh
        .storage(json!({"operation":"get","collection":"proxy_configs","key":"p1"}))
        .await;
    assert_eq!(get.json()["data"], doc);
    // Without a body requestId, the header's is echoed.
    assert!(get.json()["requestId"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
    let missing = kh
        .storage(json!({"operation":"get","collection":"proxy_configs","key":"nope"}))
        .await;
    assert_eq!(missing.status, 200);
    assert!(missing.json()["data"].is_null());
    assert!(missing.json().as_object().unwrap().contains_key("data"));
    for _ in 0..2 {
        let del = kh
            .storage(json!({"operation":"delete","collection":"proxy_configs","key":"p1"}))
            .await;
        assert_eq!(del.json()["status"], "ok");
    }
    let gone = kh
        .storage(json!({"operation":"get","collection":"proxy_configs","key":"p1"}))
        .await;
    assert!(gone.json()["data"].is_null());
}

#[tokio::test]
async fn refuses_bad_storage_requests() {
    let kh = bound().await;
    for body in [
        json!({"operation":"get","collection":"tokens"}),
        json!({"operation":"set","collection":"tokens","key":"k"}),
        json!({"operation":"set","collection":"tokens","key":"k","data":[1]}),
        json!({"operation":"delete","collection":"nope","key":"k"}),
        json!({"operation":"list"}),
        json!({"operation":"list_batch"}),
        json!({"operation":"get","collection":"tokens","key":"x".repeat(300)}),
    ] {
        kh.storage(body).await.assert_error(400, "invalid_request");
    }
}

#[tokio::test]
async fn list_builds_meta_like_the_reference() {
    let kh = bound().await;
    // A plaintext token written by the platform, and an encrypted one stored by the browser.
    kh.storage(
        json!({"operation":"set","collection":"tokens","key":"slack","data":{
        "accessToken":"xoxb-plain","refreshToken":"r","tokenType":"oauth","scope":"chat"}}),
    )
    .await;
    assert_eq!(
        kh.store(
            "github",
            json!({"accessToken":"ghp_secret_value","scope":"repo"})
        )
        .await
        .status,
        200
    );
    let list = kh
        .storage(json!({"operation":"list","collection":"tokens"}))
        .await
        .json();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["key"], "github");
    assert_eq!(items[1]["key"], "slack");
    let slack = &items[1]["meta"];
    assert_eq!(slack["serviceName"], "slack");
    assert_eq!(slack["scope"], "chat");
    assert_eq!(slack["hasRefreshToken"], true);
    assert!(slack.get("accessToken").is_none() && slack.get("refreshToken").is_none());
    let github = &items[0]["meta"];
    assert_eq!(github["serviceName"], "github");
    assert_eq!(github["scope"], "repo");
    assert_eq!(github["tokenType"], "oauth");
    assert!(!list.to_string().contains("ghp_secret_value"));
    assert!(items[0].get("data").is_none());
}

#[tokio::test]
async fn list_options_filters_cursors_and_pagination() {
    let kh = bound().await;
    for (i, kind) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        kh.storage(json!({"operation":"set","collection":"proxy_configs","key":format!("k{i}"),"data":{"meta":{"kind":kind}}})).await;
    }
    let page = kh.storage(json!({"operation":"list","collection":"proxy_configs","options":{"filters":{"kind":"a"},"limit":2}})).await.json();
    let keys: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["k0", "k2"]);
    assert_eq!(
        page["pagination"],
        json!({"hasMore": true, "nextCursor": "k2", "totalCount": 3})
    );
    let next = kh.storage(json!({"operation":"list","collection":"proxy_configs","options":{"filters":{"kind":"a"},"limit":2,"after":"k2"}})).await.json();
    let keys: Vec<&str> = next["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["k4"]);
    assert_eq!(next["pagination"]["hasMore"], false);
    assert!(next["pagination"]["nextCursor"].is_null());
    let since = kh.storage(json!({"operation":"list","collection":"proxy_configs","options":{"since":"k3","limit":10}})).await.json();
    assert_eq!(since["pagination"]["totalCount"], 2);
    // No options: no pagination object.
    let all = kh
        .storage(json!({"operation":"list","collection":"proxy_configs"}))
        .await
        .json();
    assert!(all.get("pagination").is_none());
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn audit_lists_newest_first_with_data() {
    let kh = bound().await;
    for (key, ts, action) in [
        ("e1", "2026-01-01T00:00:01Z", "read"),
        ("e2", "2026-01-03T00:00:00Z", "write"),
        ("e3", "2026-01-02T00:00:00Z", "read"),
    ] {
        kh.storage(json!({"operation":"set","collection":"audit","key":key,"data":{"timestamp":ts,"action":action}})).await;
    }
    let list = kh
        .storage(json!({"operation":"list","collection":"audit"}))
        .await
        .json();
    let keys: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["e2", "e3", "e1"]);
    assert_eq!(list["items"][0]["data"]["action"], "write");
    let filtered = kh
        .storage(json!({"operation":"list","collection":"audit","options":{"filters":{"action":"read"},"limit":1}}))
        .await
        .json();
    assert_eq!(filtered["items"][0]["key"], "e3");
    assert_eq!(filtered["pagination"]["nextCursor"], "2026-01-02T00:00:00Z");
    let after = kh
        .storage(json!({"operation":"list","collection":"audit","options":{"after":"2026-01-02T00:00:00Z","limit":5}}))
        .await
        .json();
    assert_eq!(after["items"].as_array().unwrap().len(), 1);
    assert_eq!(after["items"][0]["key"], "e1");
}

#[tokio::test]
async fn list_batch_skips_unknown_collections() {
    let kh = bound().await;
    kh.storage(
        json!({"operation":"set","collection":"vault_config","key":"settings","data":{"x":1}}),
    )
    .await;
    let batch = kh
        .storage(json!({"operation":"list_batch","collections":["vault_config","tokens","bogus"],"requestId":"rb1"}))
        .await
        .json();
    let results = batch["results"].as_object().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results["vault_config"]["items"][0]["key"], "settings");
    assert_eq!(results["tokens"]["items"], Value::Array(vec![]));
    assert_eq!(batch["requestId"], "rb1");
}
