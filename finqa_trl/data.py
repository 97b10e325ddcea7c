"""FinQA data: locate, download (with hash check) and load the official splits, strictly validated.

The official data (czyssrs/FinQA, MIT) is one JSON list per split. Each record carries `id`,
`pre_text`/`post_text` (lists of sentences), `table` (rows of strings, first cell the row name) and
`qa` (`question`, `program`, `exe_ans`, `gold_inds`, ...). `private_test` has no labels.

Where the data comes from, in order: an explicit directory, the `FINQA_DIR` environment variable,
else the tiny hand-written fixture bundled in `finqa_trl/fixtures` (so the demo and tests run
offline). `python -m finqa_trl.data download --dir data/finqa` (what `make data` runs) fetches the
official splits from a pinned upstream commit and checks their git blob SHA-1s.

This module is imported by the torch-free scorer: keep it stdlib-only at import time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import OneLineError

SPLITS: tuple[str, ...] = ("train", "dev", "test", "private_test")
#: Splits without `qa.program` / `qa.exe_ans`.
UNLABELLED_SPLITS: frozenset[str] = frozenset({"private_test"})
#: File names tried for a split, in this order.
EXTENSIONS: tuple[str, ...] = (".json", ".json.gz", ".json.xz")

FIXTURE_DIR: Path = Path(__file__).resolve().parent / "fixtures"
DEFAULT_DOWNLOAD_DIR = "data/finqa"
ENV_VAR = "FINQA_DIR"

#: Upstream commit 0f16e286 of czyssrs/FinQA; `{split}.json` is appended. A module constant so tests
#: can point it at a local file:// or 127.0.0.1 source.
URL_BASE = "https://raw.githubusercontent.com/czyssrs/FinQA/0f16e2867befa6840783e58be38c9efb9229d742/dataset"
#: Git blob SHA-1 (`git hash-object FILE`) of each upstream file at that commit.
BLOB_SHA1: dict[str, str] = {
    "train": "a6c2c5a60f9abe3fba5a793cc4d9e1dee2e09209",
    "dev": "970f239f591c782b17df420c0d343b780737f3da",
    "test": "59958c7c3bb3b21f4dff6bc912a0fe0ae710aee0",
    "private_test": "af7ef36c00f4d4d31c77d54512a01ba32bf7be92",
}

_HOW_TO_GET = (
    "run `make data` to download the official splits into data/finqa "
    f"(or `python -m finqa_trl.data download --dir DIR`), or set {ENV_VAR} to a folder holding them"
)


class DataError(OneLineError):
    """A data problem the user can fix; `str()` is always one line, fit for a CLI error."""


# --------------------------------------------------------------------------------------------- locate


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The FinQA folder to use: `data_dir` if given, else `$FINQA_DIR`, else the bundled fixture."""
    if data_dir is not None and str(data_dir) != "":
        path, source = Path(data_dir).expanduser(), "given"
    elif os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]).expanduser(), f"from {ENV_VAR}"
    else:
        path, source = FIXTURE_DIR, "bundled fixture"
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"FinQA data directory {path} ({source}) {what}; {_HOW_TO_GET}")
    return path


def available_splits(data_dir: str | Path) -> list[str]:
    """The official splits (`SPLITS`) that have a `<split>.json[.gz|.xz]` file in `data_dir`."""
    root = Path(data_dir)
    return [s for s in SPLITS if any((root / f"{s}{ext}").is_file() for ext in EXTENSIONS)]


def split_path(data_dir: str | Path, split: str) -> Path:
    """The file holding `split` in `data_dir`: `<split>.json`, `.json.gz` or `.json.xz` (first found)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"FinQA data directory {root} does not exist; {_HOW_TO_GET}")
    for ext in EXTENSIONS:
        p = root / f"{split}{ext}"
        if p.is_file():
            return p
    there = ", ".join(available_splits(root)) or "none"
    tried = ", ".join(f"{split}{ext}" for ext in EXTENSIONS)
    raise DataError(f"no FinQA split {split!r} in {root} (looked for {tried}); splits there: {there}")


# ----------------------------------------------------------------------------------------------- load


def _read_text(path: Path) -> str:
    name = path.name
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        if name.endswith(".xz"):
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def _json_type(x: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(x), "number" if isinstance(x, (int, float)) else type(x).__name__)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _check_record(rec: Any, where: str, labelled: bool) -> None:
    """Raise DataError (prefixed with `where`, which names file and record) if `rec` is malformed."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: is a JSON {_json_type(rec)}, expected an object")
    for key in ("id", "pre_text", "post_text", "table", "qa"):
        if key not in rec:
            raise DataError(f"{where}: missing required field {key!r}")
    if not isinstance(rec["id"], str) or not rec["id"]:
        raise DataError(f"{where}: field 'id' must be a non-empty string")
    for key in ("pre_text", "post_text"):
        if not _is_str_list(rec[key]):
            raise DataError(f"{where}: field {key!r} must be a list of strings")
    table = rec["table"]
    if not isinstance(table, list) or not all(_is_str_list(row) for row in table):
        raise DataError(f"{where}: field 'table' must be a list of rows, each a list of strings")
    qa = rec["qa"]
    if not isinstance(qa, dict):
        raise DataError(f"{where}: field 'qa' must be an object")
    required = ("question", "program", "exe_ans") if labelled else ("question",)
    for key in required:
        if key not in qa:
            raise DataError(f"{where}: missing required field 'qa.{key}'")
    if not isinstance(qa["question"], str):
        raise DataError(f"{where}: field 'qa.question' must be a string")
    if "program" in qa and not isinstance(qa["program"], str):
        raise DataError(f"{where}: field 'qa.program' must be a string")
    if "exe_ans" in qa:
        ans = qa["exe_ans"]
        # Official answers are floats, or "yes"/"no" for `greater`; bool is an int subclass, exclude it.
        if isinstance(ans, bool) or not isinstance(ans, (int, float, str)):
            raise DataError(f"{where}: field 'qa.exe_ans' must be a number or 'yes'/'no'")
    gold = qa.get("gold_inds")
    if gold is not None and not (
        isinstance(gold, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in gold.items())
    ):
        raise DataError(f"{where}: field 'qa.gold_inds' must map 'text_N'/'table_N' to fact strings")


def _default_labelled(name: str) -> bool:
    return name not in UNLABELLED_SPLITS


def _stem(path: Path) -> str:
    for ext in EXTENSIONS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def load_file(path: str | Path, *, labelled: bool | None = None) -> list[dict[str, Any]]:
    """Read and validate one FinQA file (.json, .json.gz or .json.xz); every record is returned.

    `labelled=None` infers it from the file name: everything but `private_test*` must carry
    `qa.program` and `qa.exe_ans`.
    """
    path = Path(path)
    if labelled is None:
        labelled = _default_labelled(_stem(path))
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a JSON {_json_type(data)}, expected a list of examples")
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        rid = rec.get("id") if isinstance(rec, dict) else None
        name = f"record {rid!r} (#{i})" if isinstance(rid, str) else f"record #{i}"
        _check_record(rec, f"{path}: {name}", labelled)
        if rid in first_seen:
            raise DataError(f"{path}: duplicate id {rid!r} in records #{first_seen[rid]} and #{i}")
        first_seen[rid] = i
    return data


def load_split(
    data_dir: str | Path | None, split: str, *, labelled: bool | None = None
) -> list[dict[str, Any]]:
    """Load `split` from `resolve_data_dir(data_dir)`; `labelled` defaults to `split != "private_test"`."""
    path = split_path(resolve_data_dir(data_dir), split)
    return load_file(path, labelled=_default_labelled(split) if labelled is None else labelled)


# ------------------------------------------------------------------------------------------- download


def git_blob_sha1(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """`git hash-object` of a file: SHA-1 of b"blob <size>\\0" + content, streamed."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, desc: str) -> None:
    """Stream `url` into `dest` with a progress bar."""
    from tqdm.auto import tqdm  # lazy: keep the module import light

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"could not download {url}: {e.reason}") from e
    except (OSError, ValueError) as e:  # timeouts, connection resets, bad URLs
        raise DataError(f"could not download {url}: {e}") from e


def download(dest_dir: str | Path, splits: Iterable[str] = SPLITS, *, force: bool = False) -> dict[str, Path]:
    """Download the official FinQA split files into `dest_dir` and verify their git blob SHA-1s.

    A file already there with the right hash is kept (unless `force`); one with a wrong hash is
    replaced. Each download goes to a temp file in `dest_dir` and is renamed into place only once its
    hash matches, so a failed or corrupted download never leaves a `<split>.json` behind.
    Returns {split: path}.
    """
    from tqdm.auto import tqdm

    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in splits if s not in BLOB_SHA1]
    if unknown:
        raise DataError(f"unknown FinQA split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    dest_root = Path(dest_dir)
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest_root}: {e}") from e
    out: dict[str, Path] = {}
    for split in splits:
        dest, want = dest_root / f"{split}.json", BLOB_SHA1[split]
        if dest.is_file() and not force:
            if git_blob_sha1(dest) == want:
                tqdm.write(f"{dest}: present, hash ok")
                out[split] = dest
                continue
            tqdm.write(f"{dest}: hash does not match upstream, downloading again")
        url = f"{URL_BASE.rstrip('/')}/{split}.json"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{split}.", suffix=".part", dir=dest_root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, split)
            got = git_blob_sha1(tmp)
            if got != want:
                raise DataError(
                    f"{url}: git blob SHA-1 is {got}, expected {want}; the download was discarded "
                    "(corrupted transfer, or upstream changed)"
                )
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is not secret
            os.replace(tmp, dest)  # atomic on one filesystem
        finally:
            tmp.unlink(missing_ok=True)
        out[split] = dest
    return out


# ------------------------------------------------------------------------------------------------ CLI


def stats(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Per-split summary of a data folder: split, file, examples, labelled, mean program steps."""
    root = resolve_data_dir(data_dir)
    rows = []
    for split in available_splits(root):
        path = split_path(root, split)
        records = load_file(path, labelled=_default_labelled(split))
        # Steps are joined by "), " in FinQA programs (row names never contain it).
        steps = [r["qa"]["program"].count("), ") + 1 for r in records if r["qa"].get("program")]
        rows.append(
            {
                "split": split,
                "file": str(path),
                "examples": len(records),
                "labelled": len(steps),
                "mean_steps": round(sum(steps) / len(steps), 2) if steps else None,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finqa_trl.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_dl = sub.add_parser("download", help="download + verify the official FinQA splits")
    p_dl.add_argument(
        "--dir", default=DEFAULT_DOWNLOAD_DIR, help=f"destination (default {DEFAULT_DOWNLOAD_DIR})"
    )
    # No argparse `choices`: download() names a bad split in one line, like every other error here.
    p_dl.add_argument("--splits", nargs="+", default=list(SPLITS), metavar="SPLIT", help=" ".join(SPLITS))
    p_dl.add_argument("--force", action="store_true", help="download again even if the hash matches")
    p_st = sub.add_parser("stats", help="examples per split")
    p_st.add_argument(
        "--dir", default=None, help=f"data folder (default ${ENV_VAR}, else the bundled fixture)"
    )
    args = parser.parse_args(argv)
    try:
        if args.cmd == "download":
            for split, path in download(args.dir, args.splits, force=args.force).items():
                print(f"{split}: {path}")
        else:
            rows = stats(args.dir)
            if not rows:
                raise DataError(f"no FinQA split files in {resolve_data_dir(args.dir)}")
            print(f"{'split':<14}{'examples':>9}{'labelled':>9}{'steps':>7}  file")
            for r in rows:
                steps = "-" if r["mean_steps"] is None else f"{r['mean_steps']:.2f}"
                print(f"{r['split']:<14}{r['examples']:>9}{r['labelled']:>9}{steps:>7}  {r['file']}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
