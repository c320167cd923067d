//! Records the git commit the binary is built from as `KEYHOLDER_GIT_COMMIT` (for `keyholder
//! --version`), first found of:
//! 1. `.cargo_vcs_info.json`, which `cargo package` writes into a packaged crate (a `cargo install` of
//!    the published crate is built from one, outside any checkout);
//! 2. `git rev-parse HEAD`, when this crate's manifest is tracked by the enclosing git checkout (so a
//!    crate unpacked inside some unrelated repository does not take that repository's commit);
//! 3. the `KEYHOLDER_GIT_COMMIT` environment variable (the container build, which has no `.git`);
//! 4. `unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KEYHOLDER_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let vcs_info = dir.join(".cargo_vcs_info.json");
    let commit = if vcs_info.is_file() {
        println!("cargo:rerun-if-changed={}", vcs_info.display());
        std::fs::read_to_string(&vcs_info)
            .ok()
            .and_then(|text| packaged_commit(&text))
    } else {
        git_commit(&dir)
    }
    .or_else(|| {
        std::env::var("KEYHOLDER_GIT_COMMIT")
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| is_commit(v))
    })
    .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KEYHOLDER_GIT_COMMIT={commit}");
}

/// 7 to 64 lowercase hex digits (abbreviated or full SHA-1 or SHA-256 object names).
fn is_commit(s: &str) -> bool {
    (7..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `git.sha1` of a `.cargo_vcs_info.json` (`{"git": {"sha1": "<hex>"}, "path_in_vcs": ".."}`).
fn packaged_commit(text: &str) -> Option<String> {
    let rest = &text[text.find("\"sha1\"")? + "\"sha1\"".len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let sha = &rest[..rest.find('"')?];
    is_commit(sha).then(|| sha.to_owned())
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}

fn git_commit(dir: &Path) -> Option<String> {
    git(dir, &["ls-files", "--error-unmatch", "Cargo.toml"])?;
    let commit = git(dir, &["rev-parse", "HEAD"]).filter(|c| is_commit(c))?;
    // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs (only files that
    // exist, since a missing one would rerun this script on every build).
    let mut watch = vec!["HEAD".to_owned()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    watch.push("packed-refs".to_owned());
    for name in watch {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]) {
            // Relative to `dir` unless git answered an absolute path.
            let path = dir.join(path);
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(commit)
}
