"""The built-in draft model, shipped inside the package: SmolLM2-135M distilled to 2 layers."""

from __future__ import annotations

import os

BUILTIN_DRAFT = "smollm2-draft"


def builtin_draft_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "models", BUILTIN_DRAFT)


def resolve(name: str) -> str:
    """A draft name as given on the command line: the built-in's name, a directory or a .gguf file."""
    return builtin_draft_dir() if name == BUILTIN_DRAFT else name
