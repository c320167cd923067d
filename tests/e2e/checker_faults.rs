//! `keyholder-check` against a deliberately faulty webhook of our own (`keyholder_tests::faulty`):
//! the real keyholder behind a front injecting one defect per run. Each fault must fail exactly the
//! check written to find it, and every other check must pass, so a checker that stops finding one
//! fails here.

use std::collections::BTreeSet;
use std::time::Duration;

use keyholder_check::{self as check, CheckAuth, CheckOptions};
use keyholder_tests::fast_retry;
use keyholder_tests::faulty::{Fault, FaultyWebhook, STREAM_SERVICE};

async fn run_against(fault: Fault) -> check::Report {
    let webhook = FaultyWebhook::start(fault).await;
    let mut options = CheckOptions::new(
        webhook.url.clone(),
        CheckAuth::BindCode(webhook.bind_code().await),
    );
    options.danger_allow_http = true;
    options.retry = fast_retry();
    options.timeout = Duration::from_secs(10);
    options.restart_cmd = Some(webhook.restart_cmd());
    options.stream_service = Some(STREAM_SERVICE.to_owned());
    check::run(options).await
}

fn failed(report: &check::Report) -> BTreeSet<String> {
    report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.clone())
        .collect()
}

/// Without a fault (the restart check included) everything passes: the front itself is sound.
#[tokio::test]
async fn checker_passes_against_the_front_without_a_fault() {
    let report = run_against(Fault::None).await;
    let text = report.to_text();
    assert!(report.ok(), "{text}");
    let expected = check::MATRIX.len()
        + check::PROTOCOL_24_MATRIX.len()
        + check::WIRE_MATRIX.len()
        + check::RESTART_MATRIX.len()
        + check::STREAM_MATRIX.len();
    assert_eq!(report.checks.len(), expected, "{text}");
    assert!(
        report.check("replay_after_restart").unwrap().passed,
        "{text}"
    );
    assert!(report.check("streamed_answer").unwrap().passed, "{text}");
}

/// Each fault fails exactly its check, and the failure shows the request and the answer.
#[tokio::test]
async fn checker_finds_each_fault_of_the_faulty_webhook() {
    for (fault, check_names) in Fault::ALL {
        let check_name = &check_names[0];
        let report = run_against(*fault).await;
        let text = report.to_text();
        assert_eq!(
            failed(&report),
            check_names
                .iter()
                .map(|n| n.to_string())
                .collect::<BTreeSet<_>>(),
            "{fault:?}:\n{text}"
        );
        let result = report.check(check_name).unwrap();
        assert!(
            result.detail.contains(fault.finding()),
            "{fault:?}: {}\n{text}",
            result.detail
        );
        assert!(
            text.contains(&format!("FAIL {}/{check_name}", result.group)),
            "{text}"
        );
        if let Some(exchange) = &result.failed_exchange {
            assert!(exchange.starts_with("request: "), "{exchange}");
            assert!(exchange.contains("\nanswer: "), "{exchange}");
            assert!(
                !exchange.contains("ticket=ey"),
                "ticket shown unmasked: {exchange}"
            );
        }
    }
}
