"""FinQA data: locating, loading + validating (real sample, bundled fixture), download verification, CLI."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from finqa_trl import data
from finqa_trl.data import DataError, load_file, load_split, resolve_data_dir, split_path

ROOT = Path(__file__).resolve().parents[1]
ALL_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater", "table_max", "table_min", "table_sum")
ALL_OPS += ("table_average",)


def _record(i: int = 0, **overrides) -> dict:
    rec = {
        "id": f"TEST/2020/page_{i}.pdf-1",
        "pre_text": ["revenue was $ 120 million in 2020 ."],
        "post_text": ["revenue was $ 100 million in 2019 ."],
        "filename": f"TEST/2020/page_{i}.pdf",
        "table": [["", "2020"], ["revenue", "$ 120"]],
        "table_ori": [["", "2020"], ["Revenue", "$120"]],
        "qa": {
            "question": "what was the change in revenue?",
            "program": "subtract(120, 100)",
            "exe_ans": 20.0,
            "gold_inds": {"text_0": "revenue was $ 120 million in 2020 ."},
        },
    }
    rec.update(overrides)
    return rec


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------- real sample


def test_loads_real_sample_splits(sample_dir: Path) -> None:
    sizes = {split: len(load_split(sample_dir, split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 100, "dev": 457, "test": 509}
    assert data.available_splits(sample_dir) == ["train", "dev", "test"]
    # .json.xz is what the sample ships
    assert split_path(sample_dir, "test").name == "test.json.xz"


def test_real_sample_keeps_official_types(sample_dir: Path) -> None:
    for rec in load_split(sample_dir, "dev"):
        ans = rec["qa"]["exe_ans"]
        assert isinstance(ans, float) or ans in ("yes", "no")
        assert isinstance(rec["qa"]["program"], str) and rec["qa"]["program"]


# ------------------------------------------------------------------------------------------ fixture


@pytest.fixture()
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINQA_DIR", raising=False)


@pytest.fixture(scope="module")
def fixture_splits() -> dict[str, list[dict]]:
    return {s: load_split(data.FIXTURE_DIR, s) for s in ("train", "dev", "test")}


def test_fixture_is_default_and_sized(no_env, fixture_splits) -> None:
    assert resolve_data_dir(None) == data.FIXTURE_DIR
    assert data.FIXTURE_DIR == ROOT / "finqa_trl" / "fixtures"
    assert {s: len(v) for s, v in fixture_splits.items()} == {"train": 12, "dev": 4, "test": 6}
    ids = [r["id"] for v in fixture_splits.values() for r in v]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"FIXTURE/\d{4}/page_\d+\.pdf-\d+", i) for i in ids)


def test_fixture_has_the_full_official_schema(fixture_splits) -> None:
    top = {"id", "pre_text", "post_text", "table", "table_ori", "filename", "qa"}
    qa_keys = {"question", "program", "exe_ans", "gold_inds", "steps", "answer", "explanation", "program_re"}
    qa_keys |= {"ann_table_rows", "ann_text_rows"}
    for rec in (r for v in fixture_splits.values() for r in v):
        assert set(rec) == top
        assert set(rec["qa"]) == qa_keys
        assert rec["id"].startswith(rec["filename"] + "-")
        assert len(rec["table"]) == len(rec["table_ori"])
        assert len(rec["qa"]["steps"]) == len(data_steps(rec["qa"]["program"]))
        sentences = rec["pre_text"] + rec["post_text"]
        for key, fact in rec["qa"]["gold_inds"].items():
            kind, n = key.split("_")
            if kind == "text":
                assert sentences[int(n)] == fact
            else:
                assert (
                    fact.startswith(f"the {rec['table'][int(n)][0]} of ")
                    or f", the {rec['table'][int(n)][0]}" in fact
                )


def data_steps(program: str) -> list[str]:
    return re.findall(r"\w+\([^()]*\)", program)


def test_fixture_covers_the_dsl(fixture_splits) -> None:
    recs = [r for v in fixture_splits.values() for r in v]
    programs = [r["qa"]["program"] for r in recs]
    used = {op for p in programs for op in re.findall(r"(\w+)\(", p)}
    assert used == set(ALL_OPS)
    assert {len(data_steps(p)) for p in programs} >= {1, 2, 3}
    assert any("const_m1" in p for p in programs) and any("const_100" in p for p in programs)
    assert any(re.search(r"\d%", p) for p in programs) and any("#1" in p for p in programs)
    cells = [c for r in recs for row in r["table"] for c in row]
    assert any("$" in c for c in cells) and any(re.search(r"\$ -\d+ \( \d+ \)", c) for c in cells)
    assert {r["qa"]["exe_ans"] for r in recs} >= {"yes", "no"}


def test_fixture_answers_are_what_the_official_executor_gives(fixture_splits) -> None:
    dsl = pytest.importorskip("finqa_trl.dsl")
    for rec in (r for v in fixture_splits.values() for r in v):
        result = dsl.execute(dsl.tokenize_program(rec["qa"]["program"]), rec["table"])
        assert not result.invalid, (rec["id"], result)
        assert result.value == rec["qa"]["exe_ans"], rec["id"]
        # steps[-1].res holds the final value as a string, as upstream's annotations do
        res = rec["qa"]["steps"][-1]["res"]
        assert res == result.value if isinstance(result.value, str) else float(res) == result.value


# ------------------------------------------------------------------------------------------ locating


def test_resolve_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir()
    arg_dir.mkdir()
    monkeypatch.setenv("FINQA_DIR", str(env_dir))
    assert resolve_data_dir(None) == env_dir
    assert resolve_data_dir(arg_dir) == arg_dir
    assert resolve_data_dir(str(arg_dir)) == arg_dir


def test_missing_dir_says_how_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as e:
        resolve_data_dir(tmp_path / "nope")
    msg = _one_line(e.value)
    assert str(tmp_path / "nope") in msg and "make data" in msg and "data/finqa" in msg and "FINQA_DIR" in msg
    monkeypatch.setenv("FINQA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="from FINQA_DIR"):
        load_split(None, "train")


def test_split_path_finds_compressed_and_lists_what_is_there(tmp_path: Path) -> None:
    _write(tmp_path / "train.json", [_record()])
    with gzip.open(tmp_path / "dev.json.gz", "wt") as f:
        json.dump([_record()], f)
    with lzma.open(tmp_path / "test.json.xz", "wt") as f:
        json.dump([_record()], f)
    assert split_path(tmp_path, "dev").name == "dev.json.gz"
    assert split_path(tmp_path, "test").name == "test.json.xz"
    assert load_split(tmp_path, "dev") == load_split(tmp_path, "test") == load_split(tmp_path, "train")
    with pytest.raises(DataError) as e:
        split_path(tmp_path, "private_test")
    msg = _one_line(e.value)
    assert str(tmp_path) in msg and "private_test.json.xz" in msg and "train, dev, test" in msg


# ------------------------------------------------------------------------------------ malformed input


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    p.write_text('[\n  {"id": "a",\n   "pre_text": [1 2]}\n]\n')
    with pytest.raises(DataError) as e:
        load_file(p)
    msg = _one_line(e.value)
    assert str(p) in msg and "line 3, column" in msg


def test_malformed_compressed_file(tmp_path: Path) -> None:
    p = tmp_path / "dev.json.xz"
    p.write_bytes(b"definitely not xz")
    with pytest.raises(DataError, match=re.escape(str(p))):
        load_file(p)


def test_top_level_must_be_a_list(tmp_path: Path) -> None:
    p = _write(tmp_path / "dev.json", {"data": [_record()]})
    with pytest.raises(DataError, match=r"top level is a JSON object, expected a list"):
        load_file(p)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("table"), "missing required field 'table'"),
        (lambda r: r["qa"].pop("question"), "missing required field 'qa.question'"),
        (lambda r: r["qa"].pop("program"), "missing required field 'qa.program'"),
        (lambda r: r["qa"].pop("exe_ans"), "missing required field 'qa.exe_ans'"),
        (lambda r: r.update(pre_text="one sentence"), "'pre_text' must be a list of strings"),
        (lambda r: r.update(post_text=["ok", 3]), "'post_text' must be a list of strings"),
        (lambda r: r.update(table=["revenue", "$ 120"]), "'table' must be a list of rows"),
        (lambda r: r.update(table=[["revenue", 120.0]]), "'table' must be a list of rows"),
        (lambda r: r.update(qa=[]), "'qa' must be an object"),
        (lambda r: r["qa"].update(exe_ans=None), "'qa.exe_ans' must be a number"),
        (lambda r: r["qa"].update(gold_inds=["x"]), "'qa.gold_inds' must map"),
    ],
)
def test_bad_record_names_file_and_record(tmp_path: Path, mutate, expected: str) -> None:
    recs = [_record(0), _record(1), _record(2)]
    mutate(recs[1])
    p = _write(tmp_path / "test.json", recs)
    with pytest.raises(DataError) as e:
        load_file(p)
    msg = _one_line(e.value)
    assert str(p) in msg and "record 'TEST/2020/page_1.pdf-1' (#1)" in msg and expected in msg


def test_record_without_id_is_named_by_index(tmp_path: Path) -> None:
    recs = [_record(0), _record(1), "not a record"]
    recs[1].pop("id")
    p = _write(tmp_path / "train.json", recs)
    with pytest.raises(DataError, match=r"record #1: missing required field 'id'"):
        load_file(p)
    recs[1] = _record(1)
    _write(p, recs)
    with pytest.raises(DataError, match=r"record #2: is a JSON string, expected an object"):
        load_file(p)


def test_duplicate_ids(tmp_path: Path) -> None:
    p = _write(tmp_path / "dev.json", [_record(0), _record(1), _record(0)])
    with pytest.raises(DataError) as e:
        load_file(p)
    msg = _one_line(e.value)
    assert str(p) in msg and "duplicate id 'TEST/2020/page_0.pdf-1'" in msg and "#0 and #2" in msg


def test_unlabelled_split_needs_no_program(tmp_path: Path) -> None:
    rec = _record()
    rec["qa"] = {"question": "what was revenue in 2020?"}
    _write(tmp_path / "private_test.json", [rec])
    assert load_split(tmp_path, "private_test")[0]["qa"] == rec["qa"]
    # the same file under a labelled name, or with labelled=True, is an error
    shutil.copy(tmp_path / "private_test.json", tmp_path / "test.json")
    with pytest.raises(DataError, match="qa.program"):
        load_split(tmp_path, "test")
    with pytest.raises(DataError, match="qa.program"):
        load_split(tmp_path, "private_test", labelled=True)
    assert len(load_split(tmp_path, "test", labelled=False)) == 1


def test_data_error_is_one_line() -> None:
    assert str(DataError("a\nb\n  c")) == "a b c"


# ------------------------------------------------------------------------------------------- download


def _blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture()
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """A fake upstream: split files in tmp_path/src served at a file:// URL, their hashes patched in."""
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i, split in enumerate(data.SPLITS):
        files[split] = (json.dumps([_record(i)], indent=1) + "\n").encode()
        (src / f"{split}.json").write_bytes(files[split])
    monkeypatch.setattr(data, "URL_BASE", src.as_uri())
    monkeypatch.setattr(data, "BLOB_SHA1", {s: _blob_sha1(b) for s, b in files.items()})
    return files


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_bytes(b'[{"id": "x"}]\n')
    assert data.git_blob_sha1(p) == _blob_sha1(p.read_bytes())
    if shutil.which("git"):
        out = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True, check=True)
        assert data.git_blob_sha1(p) == out.stdout.strip()


def test_download_verifies_and_skips(tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "data" / "finqa"
    got = data.download(dest, ["train", "dev"])
    assert got == {"train": dest / "train.json", "dev": dest / "dev.json"}
    assert (dest / "train.json").read_bytes() == upstream["train"]
    assert sorted(p.name for p in dest.iterdir()) == ["dev.json", "train.json"]  # no temp files left
    assert len(load_split(dest, "train")) == 1

    def no_network(*args, **kwargs):
        raise AssertionError("a verified file must not be downloaded again")

    monkeypatch.setattr(data, "_fetch", no_network)
    assert data.download(dest, ["train"]) == {"train": dest / "train.json"}
    with pytest.raises(AssertionError):
        data.download(dest, ["train"], force=True)


def test_download_hash_mismatch_keeps_nothing(
    tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data.BLOB_SHA1, "test", "0" * 40)
    dest = tmp_path / "out"
    with pytest.raises(DataError) as e:
        data.download(dest, ["test"])
    msg = _one_line(e.value)
    assert "test.json" in msg and "0" * 40 in msg and data.BLOB_SHA1["dev"] not in msg
    assert list(dest.iterdir()) == []


def test_download_replaces_a_corrupt_existing_file(tmp_path: Path, upstream) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "dev.json").write_text("[]")
    data.download(dest, ["dev"])
    assert (dest / "dev.json").read_bytes() == upstream["dev"]


def test_download_errors_are_data_errors(tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "URL_BASE", (tmp_path / "missing").as_uri())
    with pytest.raises(DataError, match="could not download .*train.json"):
        data.download(tmp_path / "out", ["train"])
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(DataError, match="unknown FinQA split"):
        data.download(tmp_path / "out", ["validation"])


def test_download_over_local_http(tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "src"), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(data, "URL_BASE", f"http://127.0.0.1:{server.server_address[1]}/")
        data.download(tmp_path / "out", ["private_test"])
        assert (tmp_path / "out" / "private_test.json").read_bytes() == upstream["private_test"]
        monkeypatch.setattr(data, "URL_BASE", f"http://127.0.0.1:{server.server_address[1]}/nothing-here")
        with pytest.raises(DataError, match="HTTP 404"):
            data.download(tmp_path / "out2", ["dev"])
    finally:
        server.shutdown()
        server.server_close()


def test_pinned_source() -> None:
    assert data.URL_BASE.startswith("https://raw.githubusercontent.com/czyssrs/FinQA/0f16e2867befa6840783e")
    assert set(data.BLOB_SHA1) == set(data.SPLITS)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_stats(capsys: pytest.CaptureFixture[str]) -> None:
    assert data.main(["stats", "--dir", str(data.FIXTURE_DIR)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\s+12\s+12\s", out, re.M) and re.search(r"^test\s+6\s+6\s", out, re.M)


def test_cli_download(tmp_path: Path, upstream, capsys: pytest.CaptureFixture[str]) -> None:
    assert data.main(["download", "--dir", str(tmp_path / "d"), "--splits", "train", "test"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["test.json", "train.json"]
    capsys.readouterr()  # the progress bars
    assert data.main(["download", "--dir", str(tmp_path / "d"), "--splits", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown FinQA split(s) bogus")


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = _write(tmp_path / "train.json", [_record(0), _record(0)])
    proc = _run_module("-m", "finqa_trl.data", "stats", "--dir", str(bad.parent))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "duplicate id" in proc.stderr


def test_import_stays_torch_free() -> None:
    code = (
        "import sys, finqa_trl.data, finqa_trl.prompts; "
        "heavy = {'torch', 'transformers', 'datasets', 'tqdm'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    proc = _run_module("-c", code)
    assert proc.returncode == 0, proc.stderr
