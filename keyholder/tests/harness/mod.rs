//! What every black-box test of the built binary shares: the binary, a free loopback port, the
//! clock, random ids, a runtime, the owner's commands run on a data folder as they would be typed,
//! and waiting until a server answers healthy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keyholder_protocol::paths::PATH_HEALTH;
use serde_json::Value;

/// The `keyholder` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyholder");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A two-worker runtime, as the tests' servers and clients share the machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs owner commands on the data folder `data` (`KEYHOLDER_DATA_DIR`), as the owner types them.
pub fn owner(data: &Path) -> impl Fn(&[&str]) -> Output {
    let data: PathBuf = data.to_path_buf();
    move |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("KEYHOLDER_DATA_DIR", &data)
            .output()
            .unwrap()
    }
}

/// `keyholder bind --json` on `data` (the public URL remembered from `serve`): the issued code.
pub fn bind_json(data: &Path) -> Value {
    let out = owner(data)(&["bind", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `GET /v1/health` at `base` answers 2xx; `exited` says whether (and why) the server
/// is gone, so a crash fails at once with its reason.
pub async fn wait_healthy(
    http: &reqwest::Client,
    base: &str,
    within: Duration,
    mut exited: impl FnMut() -> Option<String>,
) {
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}{PATH_HEALTH}")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if let Some(why) = exited() {
            panic!("keyholder exited: {why}");
        }
        assert!(started.elapsed() < within, "server did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
