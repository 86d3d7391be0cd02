"""The generated modules in protocol/v1 are exactly what the .proto files produce."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto_files(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protocol" / "v1").iterdir())
    assert fresh, "protoc produced nothing"
    for rel in fresh:
        checked_in = ROOT / rel
        assert checked_in.exists(), f"{rel} is missing: run scripts/gen_proto.sh"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run scripts/gen_proto.sh"


def test_every_field_is_commented():
    """Each field carries a comment; enums are prefixed with their type name."""
    for proto in (ROOT / "proto" / "smartspec" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            text = line.strip()
            is_field = text.endswith(";") and "=" in text and not text.startswith(("syntax", "package", "option"))
            if is_field and "_UNSPECIFIED" not in text:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {text}"
