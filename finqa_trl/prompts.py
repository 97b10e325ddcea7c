"""FinQA examples -> TRL conversational prompt/completion records.

    {"prompt": [{"role": "system", "content": INSTRUCTIONS},
                ...few-shot user/assistant turns...,
                {"role": "user", "content": <report text, table, question>}],
     "completion": [{"role": "assistant", "content": <qa.program, verbatim>}]}

Program accuracy compares literal argument strings, so the prompt must let the model copy every
number exactly: the table is rendered one row per line, `| row name | cell | ... |`, with each cell
string verbatim (`$`, `%`, parentheses and all), and text sentences are never edited.

Choices made here (and why):

* Few-shot examples are chosen by `select_shots`: evenly spaced over the training set sorted by id.
  Ids start with ticker/year, so the shots spread over companies and years; there is no RNG, so the
  same k gives the same prompts on every machine and regardless of file order.
* Shots are shown with *gold* context (only their `qa.gold_inds` facts): they teach the DSL, not the
  reading, and full-context shots would multiply the prompt length by k + 1.
* Over a token budget, only context is removed, whole sentences and whole table rows at a time
  (never a cell, the question, the instructions or the program). What goes first depends on `trim`:
  `"question"` (default) ranks sentences and rows by word overlap with the question and never looks
  at the gold facts, so it is safe for evaluation; `"gold"` keeps the gold facts and drops what lies
  farthest from them first — use it for training data only, on evaluation data it leaks the answer
  location. Table rows go after text sentences, the header row last; few-shot turns go (all
  together) once every unprotected sentence and row is gone. Sizes are exact chat-template token
  counts (`prompt_token_counts`), and the fewest items are removed that make the prompt fit.

Only a passed-in tokenizer is used here; this module imports no ML library itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONTEXTS = ("full", "gold")
TRIMS = ("question", "gold")

INSTRUCTIONS = """\
Answer the question about a financial report with a program in the FinQA language; a calculator \
runs the program and its result is the answer.
A program is one or more steps separated by ", ". Every step is op(arg1, arg2) with exactly two \
arguments. Ops:
- add, subtract, multiply, divide: arithmetic, arg1 op arg2
- exp: arg1 to the power arg2
- greater: yes if arg1 > arg2, else no
- table_max, table_min, table_sum, table_average: over the numbers of one table row; arg1 is the \
row name copied exactly from the table's first column, arg2 is none: table_sum(net revenue, none)
An argument is a number, a constant, or #k: the result of step k, counting from 0. Copy numbers \
exactly as written in the text or table, without $ or units but keeping a trailing % (5.3% is \
0.053). Constants: const_1 to const_10, const_100, const_1000, const_1000000, const_m1 (-1).
Example: subtract(5829, 5735), divide(#0, 5735) is the change from 5735 to 5829 relative to 5735.
Reply with the program only."""


# ------------------------------------------------------------------------------------------ rendering


def render_table(table: Sequence[Sequence[str]]) -> str:
    """One line per row, `| row name | cell | cell |`; every cell string appears verbatim."""
    return "\n".join("| " + " | ".join(row) + " |" for row in table)


def _gold_fact_order(example: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, fact) of `qa.gold_inds` in document order: text before the table, table rows, text after.

    `text_N` indexes pre_text + post_text; `table_N` indexes table rows. Unknown keys go last.
    """
    n_pre = len(example["pre_text"])

    def order(key: str) -> tuple[int, int, str]:
        kind, _, num = key.partition("_")
        if num.isdigit():
            n = int(num)
            if kind == "text":
                return (0, n, key) if n < n_pre else (2, n, key)
            if kind == "table":
                return (1, n, key)
        return (3, 0, key)

    gold = example["qa"].get("gold_inds") or {}
    return [(k, gold[k]) for k in sorted(gold, key=order)]


def _user_content(
    example: Mapping[str, Any],
    context: str,
    drop_text: frozenset[int] = frozenset(),
    drop_rows: frozenset[int] = frozenset(),
) -> str:
    """The user turn. `drop_text` indexes pre_text + post_text, `drop_rows` the table (budget trimming)."""
    parts: list[str] = []
    if context == "gold":
        facts = [fact for _, fact in _gold_fact_order(example)]
        if facts:
            parts.append("Facts:\n" + "\n".join(facts))
    else:
        pre, post = example["pre_text"], example["post_text"]
        kept_pre = [s for i, s in enumerate(pre) if i not in drop_text]
        kept_post = [s for j, s in enumerate(post) if len(pre) + j not in drop_text]
        rows = [r for i, r in enumerate(example["table"]) if i not in drop_rows]
        if kept_pre:
            parts.append("Text before the table:\n" + "\n".join(kept_pre))
        if rows:
            parts.append("Table:\n" + render_table(rows))
        if kept_post:
            parts.append("Text after the table:\n" + "\n".join(kept_post))
    parts.append("Question: " + example["qa"]["question"])
    return "\n\n".join(parts)


def _program(example: Mapping[str, Any]) -> str | None:
    program = example.get("qa", {}).get("program")
    return program if isinstance(program, str) and program else None


# ---------------------------------------------------------------------------------------- few-shot


def _shot_eligible(example: Mapping[str, Any]) -> bool:
    return _program(example) is not None and bool(example["qa"].get("gold_inds"))


def select_shots(
    train_examples: Iterable[Mapping[str, Any]], k: int, *, exclude_ids: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """k few-shot examples, deterministic: sort the labelled examples that have gold facts by id, drop
    `exclude_ids`, and take the middles of k equal slices (evenly spaced over companies/years).

    Raises ValueError if k < 0 or fewer than k examples qualify.
    """
    if k < 0:
        raise ValueError(f"number of shots must be >= 0, got {k}")
    excluded = set(exclude_ids)
    pool = sorted(
        (ex for ex in train_examples if ex["id"] not in excluded and _shot_eligible(ex)),
        key=lambda ex: ex["id"],
    )
    if k > len(pool):
        raise ValueError(
            f"asked for {k} shots but only {len(pool)} training examples have a program and gold facts"
        )
    n = len(pool)
    return [dict(pool[(2 * i + 1) * n // (2 * k)]) for i in range(k)]


def _shot_turns(shots: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for shot in shots:
        program = _program(shot)
        if program is None:
            raise ValueError(f"few-shot example {shot.get('id')!r} has no qa.program")
        turns.append({"role": "user", "content": _user_content(shot, "gold")})
        turns.append({"role": "assistant", "content": program})
    return turns


# ------------------------------------------------------------------------------------------- budget


def prompt_token_ids(tokenizer: Any, prompts: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """The ids the model sees for each prompt: chat template applied, assistant header appended.

    Same ids as `apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)` (which renders
    the template and tokenizes it without adding special tokens), but one batched tokenizer call.
    """
    if not prompts:
        return []
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def prompt_token_counts(tokenizer: Any, prompts: Sequence[list[dict[str, str]]]) -> list[int]:
    """Tokens the model sees for each prompt (see `prompt_token_ids`)."""
    return [len(ids) for ids in prompt_token_ids(tokenizer, prompts)]


def prompt_token_count(tokenizer: Any, prompt: list[dict[str, str]]) -> int:
    """Tokens the model sees for one prompt (see `prompt_token_counts`)."""
    return prompt_token_counts(tokenizer, [prompt])[0]


_STOPWORDS = frozenset(
    "a an and are as at by for from had has have how in is it its of on or the that this to was were what "
    "which with did does do be been per than".split()
)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()) if w not in _STOPWORDS}


def _removal_order(example: Mapping[str, Any], trim: str) -> list[tuple[str, int]]:
    """Context items ("text", i) / ("row", i) in the order they are dropped, plus ("shots", 0) where
    the few-shot turns go: after all unprotected context, before protected context."""
    pre, post, table = example["pre_text"], example["post_text"], example["table"]
    sentences = list(pre) + list(post)
    q = _words(example["qa"]["question"])

    def overlap(text: str) -> int:
        return len(_words(text) & q)

    # Document positions: pre_text 0..P-1, the table at P, post_text P+1.. .
    table_pos = len(pre)

    def pos(i: int) -> int:
        return i if i < len(pre) else i + 1

    gold_text: set[int] = set()
    gold_rows: set[int] = set()
    if trim == "gold":
        for key, _ in _gold_fact_order(example):
            kind, _, num = key.partition("_")
            if num.isdigit() and kind == "text" and int(num) < len(sentences):
                gold_text.add(int(num))
            elif num.isdigit() and kind == "table" and int(num) < len(table):
                gold_rows.add(int(num))
    if trim == "gold" and (gold_text or gold_rows):
        anchors = [pos(i) for i in gold_text] + ([table_pos] if gold_rows else [])
    else:
        anchors = [table_pos]  # no gold to go by: the table is the densest evidence

    def far(i: int) -> int:
        return min(abs(pos(i) - a) for a in anchors)

    if trim == "gold":
        text_key = lambda i: (-far(i), overlap(sentences[i]))  # noqa: E731 - farthest first
    else:
        text_key = lambda i: (overlap(sentences[i]), -far(i))  # noqa: E731 - least relevant first
    # Rows: least overlap with the question first, bottom rows before top ones; header (row 0) last.
    row_key = lambda i: (overlap(" ".join(table[i])), -i)  # noqa: E731

    free_text = sorted((i for i in range(len(sentences)) if i not in gold_text), key=text_key)
    free_rows = sorted((i for i in range(1, len(table)) if i not in gold_rows), key=row_key)
    kept_text = sorted(gold_text, key=text_key)
    kept_rows = sorted(gold_rows - {0}, key=row_key)
    return (
        [("text", i) for i in free_text]
        + [("row", i) for i in free_rows]
        + [("shots", 0)]
        + [("text", i) for i in kept_text]
        + [("row", i) for i in kept_rows]
        + ([("row", 0)] if table else [])
    )


def _build_prompt(
    example: Mapping[str, Any],
    context: str,
    shots: Sequence[Mapping[str, Any]],
    removed: Sequence[tuple[str, int]],
) -> list[dict[str, str]]:
    drop_text = frozenset(i for kind, i in removed if kind == "text")
    drop_rows = frozenset(i for kind, i in removed if kind == "row")
    turns = [] if ("shots", 0) in removed else _shot_turns(shots)
    return [
        {"role": "system", "content": INSTRUCTIONS},
        *turns,
        {"role": "user", "content": _user_content(example, context, drop_text, drop_rows)},
    ]


# ----------------------------------------------------------------------------------------- formatting


def format_example(
    example: Mapping[str, Any],
    *,
    context: str = "full",
    shots: Sequence[Mapping[str, Any]] = (),
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    trim: str = "question",
) -> dict[str, Any]:
    """One FinQA example -> {"prompt": [...], "completion": [...]} in TRL's conversational form.

    `context="full"`: pre_text, table, post_text and question; `"gold"`: only the `qa.gold_inds`
    facts and the question (an oracle, for analysis). `shots` become earlier user/assistant turns.
    The completion (the program verbatim) is present only for labelled examples. With a `tokenizer`
    and `max_prompt_tokens`, context is trimmed (see the module docstring, `trim`) until the
    templated prompt fits; ValueError if even the bare question does not fit.
    """
    _check_options(context, trim)
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to measure prompts")
    return _format(example, context, shots, tokenizer, max_prompt_tokens, trim)


def _check_options(context: str, trim: str) -> None:
    if context not in CONTEXTS:
        raise ValueError(f"unknown context {context!r}; choose from {', '.join(CONTEXTS)}")
    if trim not in TRIMS:
        raise ValueError(f"unknown trim {trim!r}; choose from {', '.join(TRIMS)}")


def _check_gold(example: Mapping[str, Any], context: str) -> None:
    if context == "gold" and not example["qa"].get("gold_inds"):
        raise ValueError(
            f"example {example.get('id')!r} has no qa.gold_inds, so context='gold' is impossible"
        )


def _format(
    example: Mapping[str, Any],
    context: str,
    shots: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    budget: int | None,
    trim: str,
    n_tokens: int | None = None,
) -> dict[str, Any]:
    """format_example without option checks; `n_tokens` is the untrimmed prompt's size if known."""
    _check_gold(example, context)
    prompt = _build_prompt(example, context, shots, ())
    if budget is not None:
        if n_tokens is None:
            n_tokens = prompt_token_count(tokenizer, prompt)
        if n_tokens > budget:
            prompt = _fit(example, context, shots, tokenizer, budget, trim, n_tokens)
    out: dict[str, Any] = {"prompt": prompt}
    program = _program(example)
    if program is not None:
        out["completion"] = [{"role": "assistant", "content": program}]
    return out


def _fit(
    example: Mapping[str, Any],
    context: str,
    shots: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    budget: int,
    trim: str,
    full_size: int,
) -> list[dict[str, str]]:
    """The prompt with the fewest context items removed (in `_removal_order`) that fits `budget`;
    `full_size` is the token count of the untrimmed prompt (known to exceed `budget`)."""
    order = _removal_order(example, trim)
    if context == "gold":
        order = [("shots", 0)]  # gold context is never trimmed: it is the facts the answer needs
    if not shots:
        order = [item for item in order if item[0] != "shots"]

    sizes: dict[int, int] = {0: full_size}

    def measure(*ms: int) -> None:  # exact sizes with m items of `order` removed, in one batched call
        todo = [m for m in dict.fromkeys(ms) if m not in sizes]
        built = [_build_prompt(example, context, shots, order[:m]) for m in todo]
        sizes.update(zip(todo, prompt_token_counts(tokenizer, built), strict=True))

    def size(m: int) -> int:
        measure(m)
        return sizes[m]

    # The token count falls monotonically as items are removed, so we want the smallest m with
    # size(m) <= budget. Tokenizing is the cost (~1.5 ms per 1k-token prompt), so rather than a plain
    # binary search we guess m from per-item token counts (one batched call), then gallop from the
    # guess to bracket the answer and bisect the bracket. The guess is almost always exact, so this
    # takes ~2 exact counts per prompt instead of ~7.
    # Invariant: size(lo) > budget (lo=0: full_size), size(hi) <= budget (hi=len checked last).
    lo, hi = 0, len(order)
    m = _guess_cut(example, order, shots, tokenizer, size(0) - budget)
    m = min(max(m, lo + 1), hi)
    measure(m - 1, m)  # the usual answer is m itself: confirm both sides of it at once
    step = 1
    if size(m) <= budget:
        hi = m
        while hi - step > lo and size(hi - step) <= budget:
            hi -= step
            step *= 2
        lo = max(lo, hi - step)
    else:
        lo = m
        while lo + step < hi and size(lo + step) > budget:
            lo += step
            step *= 2
        hi = min(hi, lo + step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            hi = mid
        else:
            lo = mid
    if size(hi) > budget:  # only possible for hi == len(order): nothing left to remove
        raise ValueError(
            f"example {example.get('id')!r}: instructions + question alone take {size(hi)} tokens, "
            f"more than max_prompt_tokens={budget}"
        )
    return _build_prompt(example, context, shots, order[:hi])


def _guess_cut(
    example: Mapping[str, Any],
    order: Sequence[tuple[str, int]],
    shots: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    excess: int,
) -> int:
    """How many items of `order` to remove to shed `excess` tokens, from per-item token counts."""
    sentences = list(example["pre_text"]) + list(example["post_text"])
    texts = []
    for kind, i in order:
        if kind == "text":
            texts.append(sentences[i] + "\n")
        elif kind == "row":
            texts.append(render_table([example["table"][i]]) + "\n")
        else:
            texts.append("\n".join(t["content"] for t in _shot_turns(shots)))
    try:
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    except Exception:  # a tokenizer without batch __call__: start the search in the middle
        return len(order) // 2
    total = 0
    for m, n in enumerate(counts, start=1):
        total += n
        if total >= excess:
            return m
    return len(order)


def format_split(
    examples: Sequence[Mapping[str, Any]],
    *,
    context: str = "full",
    eg_k: int = 0,
    train_examples: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    trim: str = "question",
    return_ids: bool = False,
) -> list[dict[str, Any]]:
    """`format_example` for every example, plus its "id". `eg_k` shots come from `train_examples`
    (the same k for every example, except that an example never sees itself as a shot).

    With `return_ids` (and a budget), each record also has "prompt_ids": the generation prompt's token ids
    as `prompt_token_ids` gives them, kept from measuring the prompt so that generation need not tokenize
    it again; None for a prompt that had to be trimmed (it was measured in pieces)."""
    _check_options(context, trim)
    if not isinstance(eg_k, int) or eg_k < 0:
        raise ValueError(f"eg_k (number of few-shot examples) must be an integer >= 0, got {eg_k!r}")
    if eg_k > 0 and not train_examples:
        raise ValueError(f"eg_k={eg_k} needs train_examples to draw the few-shot examples from")
    if max_prompt_tokens is not None and (tokenizer is None or max_prompt_tokens <= 0):
        raise ValueError("max_prompt_tokens must be a positive integer and needs a tokenizer")
    base = select_shots(train_examples or (), eg_k)
    base_ids = {s["id"] for s in base}
    shots_for = [
        base if ex["id"] not in base_ids else select_shots(train_examples or (), eg_k, exclude_ids=[ex["id"]])
        for ex in examples
    ]
    ids: list[list[int] | None] = [None] * len(examples)
    if max_prompt_tokens is not None:
        # Measure all untrimmed prompts in batched tokenizer calls; only those over budget get trimmed.
        for ex in examples:
            _check_gold(ex, context)
        for start in range(0, len(examples), 256):
            chunk = range(start, min(start + 256, len(examples)))
            full = [_build_prompt(examples[i], context, shots_for[i], ()) for i in chunk]
            for i, prompt_ids in zip(chunk, prompt_token_ids(tokenizer, full), strict=True):
                ids[i] = prompt_ids
    records = []
    for ex, shots, prompt_ids in zip(examples, shots_for, ids, strict=True):
        n = None if prompt_ids is None else len(prompt_ids)
        record = {"id": ex["id"], **_format(ex, context, shots, tokenizer, max_prompt_tokens, trim, n)}
        if return_ids:
            fits = n is not None and max_prompt_tokens is not None and n <= max_prompt_tokens
            record["prompt_ids"] = prompt_ids if fits else None
        records.append(record)
    return records
