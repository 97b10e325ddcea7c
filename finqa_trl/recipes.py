"""Training recipes: YAML files in `recipes/` that inherit shared settings from `_`-prefixed files.

A recipe holds only what differs from its parent, named by `base:` (a path relative to the recipe file):

    # recipes/qdora-3b.yaml
    base: _4bit.yaml
    model_name_or_path: meta-llama/Llama-3.2-3B-Instruct
    use_dora: true

`resolve()` follows the `base:` chain (any depth, cycles rejected) and merges it, child keys winning, into
one flat mapping of `TrlParser` fields (our `FinQAArguments`, TRL's `SFTConfig` and `ModelConfig`). Files
whose name starts with `_` are fragments, not runnable recipes.

    python -m finqa_trl.recipes list          # table: name, model, method, quantization
    python -m finqa_trl.recipes check NAME    # exit 2 (one line) if NAME is unknown or does not resolve
    python -m finqa_trl.recipes show NAME     # the resolved recipe as YAML

Kept light: importing this module loads no ML library.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import OneLineError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BASE_KEY = "base"


class RecipeError(OneLineError):
    """A recipe that does not exist or does not resolve; `str()` is one line."""


@dataclass
class Recipe:
    name: str
    path: Path
    values: dict[str, Any]
    # key -> file that set it last (for error messages about a misspelled key)
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return method_name(self.values)

    @property
    def quantization(self) -> str:
        return quantization_name(self.values)


def method_name(values: Mapping[str, Any]) -> str:
    """LoRA / DoRA / QLoRA / QDoRA (or "full" without PEFT)."""
    if not values.get("use_peft", False):
        return "full"
    name = "DoRA" if values.get("use_dora") else "LoRA"
    return f"Q{name}" if values.get("load_in_4bit") else name


def quantization_name(values: Mapping[str, Any]) -> str:
    if values.get("load_in_4bit"):
        kind = str(values.get("bnb_4bit_quant_type", "nf4")).upper()
        extra = "+DQ" if values.get("use_bnb_nested_quant") else ""
        return f"4-bit {kind}{extra}"
    if values.get("load_in_8bit"):
        return "8-bit"
    return "-"


# Before 2026-11-26 predict named every 4-bit evaluation "4-bit NF4"; it always loaded NF4 with double
# quantization, which quantization_name calls "4-bit NF4+DQ" ("4-bit NF4" now means no double quantization).
# Metrics files of that time are those without the "generation" field, which came with today's naming.
_OLD_QUANT_NAMES = {"4-bit NF4": "4-bit NF4+DQ"}


def known_quant(metrics: Mapping[str, Any]) -> str | None:
    """The quantization a metrics file records, in today's naming (None where it records none)."""
    name = metrics.get("quant")
    if name and "generation" not in metrics:
        return _OLD_QUANT_NAMES.get(name, name)
    return name


def available(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Runnable recipe names (YAML files not starting with `_`), sorted."""
    if not recipes_dir.is_dir():
        return []
    return sorted(p.stem for p in recipes_dir.glob("*.yaml") if not p.name.startswith("_"))


def _unknown(name: str, recipes_dir: Path) -> RecipeError:
    names = available(recipes_dir)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return RecipeError(f"unknown recipe {name!r}{hint}; available: {', '.join(names) or 'none'}")


def recipe_path(name_or_path: str | Path, recipes_dir: Path = RECIPES_DIR) -> Path:
    """`lora-1b`, `recipes/lora-1b.yaml` or any YAML path -> an existing recipe file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            if path.name.startswith("_"):
                raise RecipeError(f"{path} is a shared fragment (name starts with _), not a runnable recipe")
            return path
        raise _unknown(path.stem, recipes_dir)
    candidate = recipes_dir / f"{text}.yaml"
    if text.startswith("_") or "/" in text or not candidate.is_file():
        raise _unknown(text, recipes_dir)
    return candidate


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of settings, got {type(data).__name__}")
    return data


RUN_RECIPE = "recipe.yaml"  # the fully resolved recipe that training saves in its output_dir


def run_recipe_file(path: str | Path) -> Path | None:
    """The recipe.yaml of the run `path` belongs to: in it, or one up (<run>/merged, <run>/checkpoint-N)."""
    for d in (Path(path), Path(path).parent):
        if (d / RUN_RECIPE).is_file():
            return d / RUN_RECIPE
    return None


def checkpoint_step(folder: Path) -> int:
    """N of a run's `checkpoint-N` folder, else -1 (sorts checkpoints by step, not by name)."""
    tail = folder.name.removeprefix("checkpoint-")
    return int(tail) if folder.name.startswith("checkpoint-") and tail.isdigit() else -1


def read_run_recipe(path: str | Path) -> dict[str, Any]:
    """That recipe's settings ({} when `path` is not part of a run); RecipeError if it is unreadable."""
    f = run_recipe_file(path)
    return _read(f) if f else {}


def resolve(name_or_path: str | Path, recipes_dir: Path = RECIPES_DIR) -> Recipe:
    """Follow the `base:` chain of a recipe and merge it (child wins). Raises RecipeError."""
    path = recipe_path(name_or_path, recipes_dir)
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    current: Path | None = path
    while current is not None:
        current = current.resolve()
        if current in seen:
            raise RecipeError(f"{path}: the base chain loops at {current.name}")
        seen.add(current)
        data = _read(current)
        parent = data.pop(BASE_KEY, None)
        chain.append((current, data))
        if parent is None:
            current = None
        elif not isinstance(parent, str):
            raise RecipeError(f"{current}: `{BASE_KEY}:` must be one file name, got {parent!r}")
        else:
            current = current.parent / parent
            if not current.is_file():
                raise RecipeError(f"{chain[-1][0]}: base file {parent} not found")
    values: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for file, data in reversed(chain):  # root first, so children override
        values.update(data)
        sources.update(dict.fromkeys(data, file))
    return Recipe(name=path.stem, path=path, values=values, sources=sources)


def check_keys(recipe: Recipe, known: Iterable[str]) -> None:
    """RecipeError naming the first key no argument dataclass knows (with the file that set it)."""
    known = set(known)
    for key in recipe.values:
        if key not in known and key != "env":  # `env:` is TrlParser's: environment variables to set
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            where = recipe.sources.get(key, recipe.path)
            raise RecipeError(f"{where}: unknown setting {key!r}{hint}")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def list_table(recipes_dir: Path = RECIPES_DIR) -> str:
    rows = [("recipe", "model", "method", "quantization")]
    for name in available(recipes_dir):
        try:
            r = resolve(name, recipes_dir)
            rows.append((name, str(r.values.get("model_name_or_path", "?")), r.method, r.quantization))
        except RecipeError as err:
            rows.append((name, f"error: {err}", "", ""))
    return _table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finqa_trl.recipes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="table of the runnable recipes")
    for cmd, text in (("check", "exit 2 unless NAME resolves"), ("show", "print the resolved recipe")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            print(list_table())
            return 0
        recipe = resolve(args.name)
        from .train import known_settings  # the argument dataclasses: needs trl, so only here

        check_keys(recipe, known_settings())
        if args.cmd == "show":
            first = {k: recipe.values[k] for k in ("model_name_or_path",) if k in recipe.values}
            out = {"recipe": recipe.name, **first, **recipe.values}
            sys.stdout.write(yaml.safe_dump(out, sort_keys=False))
        return 0
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
