"""Merge a trained LoRA/DoRA adapter into its base: a standalone bf16 model + tokenizer.

    python -m finqa_trl.merge ADAPTER_DIR [--output DIR] [--base BASE] [--force] [--dtype bfloat16]
        [--overwrite]

The base is the one the adapter was trained on (its `recipe.yaml`, else its adapter config), loaded in
`--dtype` (never 4-bit, also for QLoRA/QDoRA adapters: merging into NF4 weights would round them).
`--output` defaults to ADAPTER_DIR/merged; the run's `recipe.yaml` is copied there so that evaluation
and the report know what the merged model is. `python -m finqa_trl.predict --model DIR` loads the result.
Bad input: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from . import OneLineError, one_line
from .predict import PredictError, inspect_model
from .recipes import RUN_RECIPE, run_recipe_file

logger = logging.getLogger("finqa_trl.merge")


def merge(
    adapter_dir: str | Path,
    output: str | Path | None = None,
    *,
    base: str | None = None,
    force: bool = False,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Check the input (PredictError, before loading or writing anything), merge, save; return the output."""
    from .modeling import merge_adapter

    if not Path(adapter_dir).is_dir():  # else a missing local run would be taken for a Hub id
        raise PredictError(f"{adapter_dir}: no such directory (train it first: make train RECIPE=...)")
    spec = inspect_model(str(adapter_dir), base, force)
    if spec.kind != "adapter":
        raise PredictError(f"{adapter_dir} is a full model, not an adapter: nothing to merge")
    out = Path(output) if output else Path(spec.model) / "merged"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PredictError(
            f"{out} exists and is not empty: pass --overwrite to replace it, or another --output"
        )
    if out.is_dir() and any(out.iterdir()) and overwrite:
        if not (out / "config.json").is_file():  # --overwrite replaces a model, never an arbitrary folder
            raise PredictError(f"{out} is not empty and holds no model: pick another --output")
        shutil.rmtree(out)  # no stale shards of an earlier merge may survive next to the new ones
    # The tokenizer saved beside the adapter is the one it was trained with; merge_adapter copies it.
    merged = merge_adapter(spec.model, out, base=spec.load_from, gguf_file=spec.gguf_file, dtype=dtype)
    recipe = run_recipe_file(spec.model)  # in the run, or one up for <run>/checkpoint-N
    if recipe is not None:
        shutil.copyfile(recipe, merged / RUN_RECIPE)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(prog="python -m finqa_trl.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter_dir", help="training output_dir holding adapter_config.json")
    ap.add_argument("--output", help="where the merged model goes (default: ADAPTER_DIR/merged)")
    ap.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    ap.add_argument("--force", action="store_true", help="accept a --base unlike the recorded one")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = ap.parse_args(argv)

    try:
        out = merge(
            args.adapter_dir,
            args.output,
            base=args.base,
            force=args.force,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (OneLineError, OSError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"merged model saved in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
