//! An AWS endpoint stand-in on 127.0.0.1 that verifies Signature Version 4 with botocore (the AWS
//! SDK for Python's signer, `tests/sigv4/verifier.py`), independent of the keyholder's signer.
//! botocore comes from `KEYHOLDER_SIGV4_PYTHON` (set by `.ci/run`) or a venv made under
//! `target/sigv4-venv` on first use.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The pinned botocore of `.ci/run`.
pub const BOTOCORE: &str = "botocore==1.44.5";

/// A Python interpreter that can import botocore.
pub fn sigv4_python() -> PathBuf {
    crate::python::python_with(
        "KEYHOLDER_SIGV4_PYTHON",
        "sigv4-venv",
        "botocore.auth",
        BOTOCORE,
    )
}

/// The verifier process; killed when dropped.
pub struct SigV4Verifier {
    child: Child,
    port: u16,
}

impl SigV4Verifier {
    /// Starts one with `config` (see the script: region, service, keys, optional sts).
    pub async fn start(mut config: Value) -> SigV4Verifier {
        let python = sigv4_python();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        config["port"] = port.into();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sigv4/verifier.py");
        let child = Command::new(python)
            .arg(script)
            .arg(config.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let verifier = SigV4Verifier { child, port };
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "SigV4 verifier did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        verifier
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// Every request received so far, with the verdict.
    pub async fn records(&self) -> Vec<Value> {
        let answer = reqwest::get(self.url("/__records")).await.unwrap();
        answer.json().await.unwrap()
    }
}

impl Drop for SigV4Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
