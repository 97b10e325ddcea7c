"""Shared test fixtures: where the real FinQA sample and the Llama 3 tokenizer live.

CI sets FINQA_SAMPLE_DIR / LLAMA3_TOKENIZER_DIR; otherwise we look beside the checkout
(`../shared/...`), which is where both sit on the project's machines. Tests that need them skip
elsewhere, so the suite still runs anywhere on the bundled fixture alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_lora_dropout.py runs the project's own
# on the CPU). Triton reads this when a kernel is defined, so it is set before any test module imports one.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _locate(env: str, rel: str) -> Path | None:
    if os.environ.get(env):
        p = Path(os.environ[env])
        return p if p.is_dir() else None
    p = ROOT.parent / "shared" / rel
    return p if p.is_dir() else None


# main() of a finqa_trl module, then whether the process group it started is gone: freed, so its gloo threads
# were joined while the interpreter was alive (finqa_trl.modeling.import_before_process_group says why)
_MAIN_THEN_GROUP_FREED = """
import sys, weakref
import torch.distributed as dist
from finqa_trl.{module} import main

groups = []
init = dist.init_process_group


def init_and_watch(*args, **kwargs):
    init(*args, **kwargs)
    groups.append(weakref.ref(dist.group.WORLD))


dist.init_process_group = init_and_watch
rc = main(sys.argv[1:])
if rc == 0 and (not groups or any(group() is not None for group in groups)):
    print("error: the process group outlived main()", groups, file=sys.stderr)
    rc = 3
sys.exit(rc)
"""


def torchrun_main(module: str, *options: str) -> list[str]:
    """What follows `python` to run `finqa_trl.<module>` on two CPU processes (torchrun with `options`, gloo),
    failing (exit 3) where the process group outlived main(): kept past destroy_process_group, it made some
    runs abort at exit (SIGABRT) after everything was saved."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *options]
    code = _MAIN_THEN_GROUP_FREED.format(module=module)
    # -u: unbuffered, as torchrun starts a script itself (a rank it ends keeps what it printed)
    return [*torchrun, "--no-python", sys.executable, "-u", "-c", code]


SAMPLE_DIR = _locate("FINQA_SAMPLE_DIR", "data/finqa-sample")
TOKENIZER_DIR = _locate("LLAMA3_TOKENIZER_DIR", "models/llama-3-tokenizer")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if SAMPLE_DIR is None:
        pytest.skip("real FinQA sample not available (set FINQA_SAMPLE_DIR)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama 3 tokenizer as a loadable folder (tokenizer.json decompressed)."""
    if TOKENIZER_DIR is None:
        pytest.skip("Llama 3 tokenizer not available (set LLAMA3_TOKENIZER_DIR)")
    from finqa_trl.bench import tokenizer_dir

    return tokenizer_dir(TOKENIZER_DIR, tmp_path_factory.mktemp("llama3-tokenizer-dir"))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The Llama 3 tokenizer (with its chat template), loaded offline from TOKENIZER_DIR.

    The folder ships tokenizer.json xz-compressed; it is decompressed once per session into a temp dir.
    """
    if TOKENIZER_DIR is None:
        pytest.skip("Llama 3 tokenizer not available (set LLAMA3_TOKENIZER_DIR)")
    from transformers import AutoTokenizer

    from finqa_trl.bench import tokenizer_dir

    out = tokenizer_dir(TOKENIZER_DIR, tmp_path_factory.mktemp("llama3-tokenizer"))
    return AutoTokenizer.from_pretrained(out)
