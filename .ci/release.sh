#!/usr/bin/env bash
# Release checks (issue 25), run by .ci/run on a clean checkout:
#   1. `cargo package` (verifying) of every published crate, in dependency order, in one run: cargo
#      packages the workspace's crates into a temporary local registry overlaying crates.io, so each
#      crate is verified against the packaged versions of the ones before it, not the paths;
#   2. the dependency licence check (cargo-deny, deny.toml: licences only, no advisory database);
#   3. the CycloneDX SBOM of the keyholder binary (and of keyholder-check) in target/sbom/;
#   4. `cargo install --locked --path keyholder` into a temporary root with a clean target folder,
#      and the installed binary's --version (package version, this commit, protocol version).
# cargo-deny and cargo-cyclonedx are installed from crates.io (pinned) only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo "== .ci/release.sh +$(( $(date +%s) - t0 ))s: $*"; }
target="${CARGO_TARGET_DIR:-target}"
version=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "keyholder"))')
commit=$(git rev-parse HEAD)

tools=()
command -v cargo-deny >/dev/null 2>&1 || tools+=("cargo-deny@0.20.2")
command -v cargo-cyclonedx >/dev/null 2>&1 || tools+=("cargo-cyclonedx@0.5.9")
if [ ${#tools[@]} -gt 0 ]; then
    step "installing ${tools[*]}"
    cargo install --locked --quiet "${tools[@]}"
fi

step "package dry runs: keyholder-protocol, keyholder-client, keyholder-check, keyholder"
# cargo treats registry crates as immutable: it reuses an unpacked name-version of its temporary local
# registry under $CARGO_HOME/registry/src/-<hash>/ and the artifacts built from it in the target
# folder, so a second run at the same version would verify against the previous run's code. Remove
# both first (only these crates; cargo clean -p also drops their workspace artifacts, rebuilt below).
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/keyholder{,-protocol,-client,-check}-"$version"
cargo clean --quiet -p keyholder-protocol -p keyholder-client -p keyholder-check -p keyholder
cargo package --locked -p keyholder-protocol -p keyholder-client -p keyholder-check -p keyholder
for crate in keyholder-protocol keyholder-client keyholder-check keyholder; do
    ls -l "$target/package/$crate-$version.crate"
done

step "licence check (deny.toml)"
cargo deny --locked check licenses

step "SBOM (CycloneDX)"
# cargo-cyclonedx writes next to each manifest; move the shipped binaries' SBOMs to the build output.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) \
    cargo cyclonedx --manifest-path keyholder/Cargo.toml --format json --spec-version 1.5 \
    --describe binaries --quiet
mkdir -p "$target/sbom"
mv keyholder/keyholder_bin.cdx.json "$target/sbom/keyholder-$version.cdx.json"
mv check/keyholder-check_bin.cdx.json "$target/sbom/keyholder-check-$version.cdx.json"
rm -f ./*/*_bin.cdx.json
python3 - "$target/sbom/keyholder-$version.cdx.json" "$version" <<'PY'
import json, sys
bom = json.load(open(sys.argv[1]))
assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5", "not a CycloneDX 1.5 BOM"
main = bom["metadata"]["component"]
assert (main["name"], main["version"]) == ("keyholder", sys.argv[2]), main
names = {c["name"] for c in bom["components"]}
for crate in ("keyholder-protocol", "actix-web", "rusqlite", "aes-gcm", "ed25519-dalek"):
    assert crate in names, f"{crate} missing from the SBOM"
missing = [c["name"] for c in bom["components"] if not c.get("licenses")]
assert not missing, f"components without a licence: {missing}"
print(f"SBOM of the keyholder binary: {sys.argv[1]} ({len(bom['components'])} components)")
PY
echo "SBOM of the keyholder-check binary: $target/sbom/keyholder-check-$version.cdx.json"

step "cargo install --locked --path keyholder (clean target folder)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo install --locked --quiet --path keyholder --root "$scratch/root" --target-dir "$scratch/target"
installed=$("$scratch/root/bin/keyholder" --version)
echo "$installed"
protocol=$(grep -o 'PROTOCOL_VERSION: &str = "[^"]*"' protocol/src/paths.rs | cut -d'"' -f2)
[ "$installed" = "keyholder $version (commit $commit, protocol $protocol)" ] \
    || { echo "unexpected --version: $installed" >&2; exit 1; }
step "done"
