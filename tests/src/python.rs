//! Python interpreters with a pinned PyPI package for the tests that run a real Python peer (the
//! MCP SDK's server, botocore's SigV4 verifier): the one named by an environment variable (set by
//! `.ci/run`), else a venv made under `target/` on first use.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One venv made at a time (tests run in parallel and would race on the same folder).
static VENV: Mutex<()> = Mutex::new(());

/// A Python that can `import module`: `$env_var`, else `target/<venv>` with `requirement`
/// installed when the import fails there.
pub fn python_with(env_var: &str, venv: &str, module: &str, requirement: &str) -> PathBuf {
    if let Ok(python) = std::env::var(env_var) {
        return PathBuf::from(python);
    }
    let _one = VENV.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(venv);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", requirement])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install {requirement} failed");
    }
    python
}
