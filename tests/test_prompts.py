"""Prompt formatting: verbatim tables and programs, gold context, few-shot, token budget (Llama 3)."""

from __future__ import annotations

import copy
import random
import statistics
from pathlib import Path

import pytest

from finqa_trl import data, prompts
from finqa_trl.prompts import INSTRUCTIONS, format_example, format_split, render_table, select_shots


@pytest.fixture(scope="module")
def sample(sample_dir: Path) -> dict[str, list[dict]]:
    return {s: data.load_split(sample_dir, s) for s in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def sample_all(sample) -> list[dict]:
    return [ex for split in ("train", "dev", "test") for ex in sample[split]]


@pytest.fixture(scope="module")
def fixture_train() -> list[dict]:
    return data.load_split(data.FIXTURE_DIR, "train")


def _user(rec: dict) -> str:
    assert rec["prompt"][-1]["role"] == "user"
    return rec["prompt"][-1]["content"]


# ------------------------------------------------------------------------------------------ rendering


def test_render_table_keeps_cells_verbatim() -> None:
    table = [
        ["", "2019", "2018"],
        ["net sales", "$ 5,829", "-12034 ( 12034 )"],
        ["margin", "6.5% ( 6.5 % )", ""],
    ]
    assert render_table(table) == (
        "|  | 2019 | 2018 |\n| net sales | $ 5,829 | -12034 ( 12034 ) |\n| margin | 6.5% ( 6.5 % ) |  |"
    )
    assert render_table([]) == ""


def test_instructions_cover_the_dsl() -> None:
    for word in ("add", "subtract", "multiply", "divide", "exp", "greater", "none", "#k", "const_m1", '", "'):
        assert word in INSTRUCTIONS
    for op in ("table_max", "table_min", "table_sum", "table_average"):
        assert op in INSTRUCTIONS
    dsl = pytest.importorskip("finqa_trl.dsl")
    assert all(op in INSTRUCTIONS for op in dsl.ALL_OPS)


def test_full_context_real_sample(sample_all) -> None:
    for ex in sample_all:
        rec = format_example(ex)
        assert [m["role"] for m in rec["prompt"]] == ["system", "user"]
        assert rec["prompt"][0]["content"] == INSTRUCTIONS
        assert rec["completion"] == [{"role": "assistant", "content": ex["qa"]["program"]}]
        user = _user(rec)
        for row in ex["table"]:
            assert render_table([row]) in user  # whole row on one line, row name first
            for cell in row:
                assert cell in user
        for sentence in ex["pre_text"] + ex["post_text"]:
            assert sentence in user
        assert user.endswith("Question: " + ex["qa"]["question"])


def test_gold_context_has_only_the_facts(sample_all) -> None:
    for ex in sample_all:
        user = _user(format_example(ex, context="gold"))
        lines = user.split("\n")
        assert lines[0] == "Facts:" and lines[-2:] == ["", "Question: " + ex["qa"]["question"]]
        assert sorted(lines[1:-2]) == sorted(ex["qa"]["gold_inds"].values())


def test_gold_facts_in_document_order(fixture_train) -> None:
    ex = next(e for e in fixture_train if e["id"] == "FIXTURE/2016/page_44.pdf-3")
    user = _user(format_example(ex, context="gold"))
    positions = [user.index(f"the {name} of 2016") for name in ("aerospace", "industrial", "corporate")]
    assert positions == sorted(positions)


def test_unlabelled_example_has_no_completion(fixture_train) -> None:
    ex = copy.deepcopy(fixture_train[0])
    ex["qa"] = {"question": ex["qa"]["question"]}
    rec = format_example(ex)
    assert set(rec) == {"prompt"}
    with pytest.raises(ValueError, match="no qa.gold_inds"):
        format_example(ex, context="gold")


def test_format_split_adds_ids_and_rejects_bad_options(fixture_train) -> None:
    out = format_split(fixture_train)
    assert [r["id"] for r in out] == [e["id"] for e in fixture_train]
    assert all(set(r) == {"id", "prompt", "completion"} for r in out)
    bad = [
        (dict(context="oracle"), "unknown context 'oracle'"),
        (dict(eg_k=-1), "eg_k"),
        (dict(eg_k=2), "needs train_examples"),
        (dict(eg_k=2, train_examples=[]), "needs train_examples"),
        (dict(eg_k=13, train_examples=fixture_train), "only 12 training examples"),
        (dict(max_prompt_tokens=512), "needs a tokenizer"),
        (dict(trim="random"), "unknown trim"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            format_split(fixture_train, **kwargs)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- few-shot


def test_select_shots_is_deterministic_and_spread(fixture_train) -> None:
    shuffled = fixture_train[:]
    random.Random(0).shuffle(shuffled)
    shots = select_shots(fixture_train, 3)
    assert [s["id"] for s in shots] == [s["id"] for s in select_shots(shuffled, 3)]
    ids = sorted(e["id"] for e in fixture_train)
    assert [s["id"] for s in shots] == [ids[2], ids[6], ids[10]]  # middles of three slices of four
    assert select_shots(fixture_train, 0) == []
    excluded = select_shots(fixture_train, 3, exclude_ids=[ids[6]])
    assert ids[6] not in {s["id"] for s in excluded} and len(excluded) == 3
    with pytest.raises(ValueError):
        select_shots(fixture_train, -1)


def test_few_shot_prompts(fixture_train) -> None:
    k = 3
    out = format_split(fixture_train, eg_k=k, train_examples=fixture_train)
    assert out == format_split(fixture_train, eg_k=k, train_examples=list(reversed(fixture_train)))
    base = select_shots(fixture_train, k)
    for ex, rec in zip(fixture_train, out, strict=True):
        roles = [m["role"] for m in rec["prompt"]]
        assert roles == ["system"] + ["user", "assistant"] * k + ["user"]
        shot_programs = [m["content"] for m in rec["prompt"][2:-1:2]]
        own_gold = format_example(ex, context="gold")["prompt"][-1]["content"]
        assert own_gold not in [m["content"] for m in rec["prompt"][1:-1:2]]  # never its own shot
        if ex["id"] not in {s["id"] for s in base}:
            assert shot_programs == [s["qa"]["program"] for s in base]
        # shots are shown with gold context
        assert all(m["content"].startswith("Facts:\n") for m in rec["prompt"][1:-1:2])
        assert _user(rec) == _user(format_example(ex))
    zero = format_split(fixture_train, eg_k=0, train_examples=fixture_train)
    assert all(len(r["prompt"]) == 2 for r in zero)


def test_few_shot_on_real_train_excludes_self(sample) -> None:
    train = sample["train"]
    out = format_split(train, eg_k=2, train_examples=train, context="gold")
    for rec in out:
        shot_turns = [m["content"] for m in rec["prompt"][1:-1]]
        assert _user(rec) not in shot_turns[0::2]
        assert len(shot_turns) == 4


# ------------------------------------------------------------------------------------- token lengths


@pytest.fixture(scope="module")
def full_lengths(sample_all, llama3_tokenizer) -> list[int]:
    """Token counts of the untrimmed zero-shot full-context prompts of the real sample."""
    return prompts.prompt_token_counts(llama3_tokenizer, [r["prompt"] for r in format_split(sample_all)])


def test_token_count_is_the_chat_template_length(fixture_train, llama3_tokenizer) -> None:
    recs = format_split(fixture_train, eg_k=2, train_examples=fixture_train)
    for rec, n in zip(
        recs, prompts.prompt_token_counts(llama3_tokenizer, [r["prompt"] for r in recs]), strict=True
    ):
        ids = llama3_tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=True)
        assert n == len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert n == prompts.prompt_token_count(llama3_tokenizer, rec["prompt"])


def test_prompt_token_lengths_real_sample(sample_all, full_lengths, llama3_tokenizer) -> None:
    lengths = full_lengths
    gold = prompts.prompt_token_counts(
        llama3_tokenizer, [r["prompt"] for r in format_split(sample_all, context="gold")]
    )
    median, top = statistics.median(lengths), max(lengths)
    system = {"role": "system", "content": INSTRUCTIONS}
    over = sum(n > 1024 for n in lengths)
    print(
        f"\nLlama 3 prompt tokens, full context, zero-shot, {len(lengths)} examples: median {median:.0f}, "
        f"p90 {sorted(lengths)[int(0.9 * len(lengths))]}, max {top}, min {min(lengths)}, >1024: {over}; "
        f"gold context: median {statistics.median(gold):.0f}, max {max(gold)}; "
        f"instructions alone: {prompts.prompt_token_count(llama3_tokenizer, [system])}"
    )
    assert 700 <= median <= 1500
    assert 2000 <= top <= 4000
    assert max(gold) < 1024


_HEADINGS = ("Text before the table:", "Table:", "Text after the table:", "Question: ")


def _content_lines(rec: dict) -> list[str]:
    return [line for line in _user(rec).split("\n") if line and not line.startswith(_HEADINGS)]


def _check_trimmed(ex: dict, rec: dict, n_tokens: int, budget: int) -> None:
    assert n_tokens <= budget, ex["id"]
    assert rec["prompt"][0]["content"] == INSTRUCTIONS
    assert rec["completion"][0]["content"] == ex["qa"]["program"]
    user = _user(rec)
    question = "Question: " + ex["qa"]["question"]
    assert user.endswith("\n\n" + question) or user == question
    # Only whole sentences and whole rows were removed.
    rows = {render_table([row]) for row in ex["table"]}
    sentences = set(ex["pre_text"] + ex["post_text"])
    assert all(line in rows or line in sentences for line in _content_lines(rec))


def test_budget_fits_every_real_prompt(sample, full_lengths, llama3_tokenizer) -> None:
    # The test split (509 examples, what evaluation trims with trim="question"); the gold-trim test below
    # covers train. Trimming 400 prompts takes a few seconds, so not all 1,066.
    budget = 1024
    examples = sample["test"]
    full_lengths = full_lengths[-len(examples) :]  # sample_all ends with the test split
    out = format_split(examples, tokenizer=llama3_tokenizer, max_prompt_tokens=budget)
    counts = prompts.prompt_token_counts(llama3_tokenizer, [r["prompt"] for r in out])
    untrimmed = format_split(examples)
    minus_one = []  # trimmed prompts with the last removed item put back: none may fit
    for ex, rec, n, full, n_full in zip(examples, out, counts, untrimmed, full_lengths, strict=True):
        _check_trimmed(ex, rec, n, budget)
        assert (rec == full) == (n_full <= budget), ex["id"]  # trimmed exactly when over budget
        if rec != full:
            order = prompts._removal_order(ex, "question")
            m = len(_content_lines(full)) - len(_content_lines(rec))  # one line per sentence or row
            assert prompts._build_prompt(ex, "full", (), order[:m]) == rec["prompt"]  # a prefix of the order
            minus_one.append(prompts._build_prompt(ex, "full", (), order[: m - 1]))
    # nothing was removed needlessly: putting back the last removed item breaks the budget
    assert min(prompts.prompt_token_counts(llama3_tokenizer, minus_one)) > budget
    after = statistics.median(counts)
    print(f"\n{len(minus_one)} of {len(out)} prompts trimmed to fit {budget} tokens; median after: {after}")
    assert len(minus_one) == sum(n > budget for n in full_lengths) > 0


def test_returned_ids_are_the_generation_prompt_ids(sample, llama3_tokenizer) -> None:
    # Generation reuses the ids measured while fitting prompts: they must be exactly what tokenizing the
    # final prompt gives, and absent (None) where the prompt was trimmed after measuring.
    examples = sample["test"][:120]
    budget = 1200  # about half of these prompts need trimming
    out = format_split(examples, tokenizer=llama3_tokenizer, max_prompt_tokens=budget, return_ids=True)
    fresh = prompts.prompt_token_ids(llama3_tokenizer, [r["prompt"] for r in out])
    untrimmed = format_split(examples)
    fitting = [rec["prompt"] == full["prompt"] for rec, full in zip(out, untrimmed, strict=True)]
    assert 0 < sum(fitting) < len(out)
    for rec, ids, fits in zip(out, fresh, fitting, strict=True):
        assert rec["prompt_ids"] == (ids if fits else None), rec["id"]
    # Opt-in: training data gets no extra column.
    plain = format_split(examples[:2], tokenizer=llama3_tokenizer, max_prompt_tokens=budget)
    assert all("prompt_ids" not in rec for rec in plain)


def test_gold_trim_keeps_gold_facts(sample, llama3_tokenizer) -> None:
    train = sample["train"]
    out = format_split(
        train, tokenizer=llama3_tokenizer, max_prompt_tokens=768, trim="gold", eg_k=2, train_examples=train
    )
    counts = prompts.prompt_token_counts(llama3_tokenizer, [r["prompt"] for r in out])
    for ex, rec, n in zip(train, out, counts, strict=True):
        _check_trimmed(ex, rec, n, 768)
        user = _user(rec)
        for key, fact in ex["qa"]["gold_inds"].items():
            kind, n = key.split("_")
            assert (fact if kind == "text" else render_table([ex["table"][int(n)]])) in user, (ex["id"], key)


def test_budget_drops_shots_before_gold_and_fails_when_impossible(fixture_train, llama3_tokenizer) -> None:
    ex, shots = fixture_train[0], select_shots(fixture_train[1:], 4)
    bare = format_example({**ex, "pre_text": [], "post_text": [], "table": []})
    bare_n = prompts.prompt_token_count(llama3_tokenizer, bare["prompt"])
    rec = format_example(
        ex, shots=shots, tokenizer=llama3_tokenizer, max_prompt_tokens=bare_n + 40, trim="gold"
    )
    assert len(rec["prompt"]) == 2  # shots gone
    assert "| net sales | $ 4812 | $ 4377 |" in _user(rec)  # the gold row stays
    tight = format_example(ex, tokenizer=llama3_tokenizer, max_prompt_tokens=bare_n)
    assert tight["prompt"] == bare["prompt"]
    with pytest.raises(ValueError, match="max_prompt_tokens=10"):
        format_example(ex, tokenizer=llama3_tokenizer, max_prompt_tokens=10)
