"""Shared test fixtures: where the real FinQA sample and the Llama 3 tokenizer live.

CI sets FINQA_SAMPLE_DIR / LLAMA3_TOKENIZER_DIR; otherwise we look beside the checkout
(`../shared/...`), which is where both sit on the project's machines. Tests that need them skip
elsewhere, so the suite still runs anywhere on the bundled fixture alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _locate(env: str, rel: str) -> Path | None:
    if os.environ.get(env):
        p = Path(os.environ[env])
        return p if p.is_dir() else None
    p = ROOT.parent / "shared" / rel
    return p if p.is_dir() else None


SAMPLE_DIR = _locate("FINQA_SAMPLE_DIR", "data/finqa-sample")
TOKENIZER_DIR = _locate("LLAMA3_TOKENIZER_DIR", "models/llama-3-tokenizer")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if SAMPLE_DIR is None:
        pytest.skip("real FinQA sample not available (set FINQA_SAMPLE_DIR)")
    return SAMPLE_DIR
