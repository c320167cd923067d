"""CycloneDX SBOM of the container image: the keyholder binary's own SBOM (from Cargo.lock, made by
cargo-cyclonedx in .ci/release.sh) plus every Debian package installed in the image's base layers.

Usage: image_sbom.py BINARY_SBOM DPKG_LIST IMAGE_NAME IMAGE_ID VERSION OUT

DPKG_LIST is the image's own `dpkg-query -W` output (package, version, architecture, source, source
version and the DEP-5 `License:` names of the package's copyright file, tab-separated; docker/test.sh
reads it from inside the image). The document is built and validated against the CycloneDX 1.5
schema with cyclonedx-python-lib, the CycloneDX project's library, so the format is never written
by hand here.
"""

import json
import sys
from pathlib import Path

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, LicenseExpression
from cyclonedx.output.json import JsonV1Dot5
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

# Debian's DEP-5 short names that differ from their SPDX identifiers (the common ones in a
# bookworm base image); anything else is kept as a named licence.
DEBIAN_TO_SPDX = {
    "GPL-2+": "GPL-2.0-or-later",
    "GPL-2": "GPL-2.0-only",
    "GPL-3+": "GPL-3.0-or-later",
    "GPL-3": "GPL-3.0-only",
    "LGPL-2+": "LGPL-2.0-or-later",
    "LGPL-2.1+": "LGPL-2.1-or-later",
    "LGPL-2.1": "LGPL-2.1-only",
    "LGPL-3+": "LGPL-3.0-or-later",
    "BSD-2-clause": "BSD-2-Clause",
    "BSD-3-clause": "BSD-3-Clause",
    "BSD-4-clause": "BSD-4-Clause",
    "Expat": "MIT",
    "Apache-2.0": "Apache-2.0",
    "public-domain": None,
}


def debian_component(fields: list[str], licences: LicenseFactory) -> Component:
    name, version, arch, source, source_version, licence_names = (fields + [""] * 6)[:6]
    qualifiers = {"arch": arch, "distro": "debian-12"}
    if source and source != name:
        qualifiers["upstream"] = f"{source}@{source_version or version}"
    purl = PackageURL(type="deb", namespace="debian", name=name, version=version, qualifiers=qualifiers)
    component = Component(
        type=ComponentType.LIBRARY if name.startswith("lib") else ComponentType.APPLICATION,
        name=name,
        version=version,
        purl=purl,
        bom_ref=str(purl),
        publisher="Debian",
    )
    seen = set()
    for raw in licence_names.split(","):
        raw = raw.strip()
        if not raw or raw in seen:
            continue
        seen.add(raw)
        spdx = DEBIAN_TO_SPDX.get(raw, raw)
        if spdx is None:
            continue
        licence = licences.make_from_string(spdx)
        # CycloneDX allows one expression or a list of single licences; Debian's "A or B" forms
        # are kept by name among the others.
        if isinstance(licence, LicenseExpression):
            licence = DisjunctiveLicense(name=raw)
        component.licenses.add(licence)
    return component


def main() -> int:
    binary_sbom, dpkg_list, image_name, image_id, version, out = sys.argv[1:7]
    binary = Bom.from_json(json.loads(Path(binary_sbom).read_text()))  # type: ignore[attr-defined]
    binary_main = binary.metadata.component
    if binary_main is None or binary_main.name != "keyholder":
        print(f"{binary_sbom}: not the keyholder binary's SBOM", file=sys.stderr)
        return 1

    image = Component(
        type=ComponentType.CONTAINER,
        name="keyholder",
        version=version,
        bom_ref="keyholder-image",
        properties=[Property(name="oci:image:name", value=image_name), Property(name="oci:image:id", value=image_id)],
    )
    bom = Bom()
    bom.metadata.component = image
    bom.metadata.licenses.add(LicenseFactory().make_from_string("Apache-2.0"))

    # The binary and everything cargo-cyclonedx found in it, as it described them.
    bom.components.add(binary_main)
    for component in binary.components:
        bom.components.add(component)
    for dependency in binary.dependencies:
        bom.dependencies.add(dependency)

    licences = LicenseFactory()
    packages = []
    for line in Path(dpkg_list).read_text().splitlines():
        if line.strip():
            packages.append(debian_component(line.split("\t"), licences))
    if not packages:
        print(f"{dpkg_list}: no Debian packages listed", file=sys.stderr)
        return 1
    for package in packages:
        bom.components.add(package)
    bom.register_dependency(image, [binary_main, *packages])

    text = JsonV1Dot5(bom).output_as_string(indent=2)
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    if error is not None:
        print(f"the image SBOM does not validate: {error}", file=sys.stderr)
        return 1
    Path(out).write_text(text)
    names = {c.name for c in bom.components}
    for needed in ("libssl3", "ca-certificates", "libc6", "keyholder", "keyholder-protocol", "rusqlite"):
        if needed not in names:
            print(f"the image SBOM lacks {needed}", file=sys.stderr)
            return 1
    print(f"SBOM of the image: {out} ({len(packages)} Debian packages, {len(binary.components)} crates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
