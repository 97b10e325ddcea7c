"""The FinQA program language: upstream's execution and equivalence rules, and robustness."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finqa_trl.data import load_split
from finqa_trl.dsl import (
    ALL_OPS,
    answers_match,
    equal_program,
    execute,
    parse_generation,
    program_to_string,
    tokenize_program,
)

TABLE = [
    ["", "2019", "2018", "2017"],
    ["net sales", "$ 5,829", "$ 5,735", "$ 5,100"],
    ["operating income", "1,200 ( 20% )", "1,100", "900"],
    ["ratio", "n/a", "1.5", "2.0"],
    ["empty"],
]


def load(sample_dir, split):
    return load_split(sample_dir, split)


# ------------------------------------------------------------------------- upstream rules, real data


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_every_gold_program_of_the_sample_executes_and_matches_itself(sample_dir, split):
    examples = load(sample_dir, split)
    assert len(examples) == {"train": 100, "dev": 457, "test": 509}[split]
    for ex in examples:
        tokens = tokenize_program(ex["qa"]["program"])
        run = execute(tokens, ex["table"])
        assert not run.invalid, (ex["id"], run)
        assert answers_match(run.value, ex["qa"]["exe_ans"]), (ex["id"], run.value, ex["qa"]["exe_ans"])
        assert equal_program(tokens, tokens), ex["id"]
        assert program_to_string(tokens) == ex["qa"]["program"]


def test_tokenization_is_upstreams():
    assert tokenize_program("subtract(5829, 5735), divide(#0, 5735)") == [
        "subtract(", "5829", "5735", ")", "divide(", "#0", "5735", ")", "EOF",
    ]  # fmt: skip
    # ", " separates tokens; a bare comma inside a literal does not.
    assert tokenize_program("add(1,000, 5)") == ["add(", "1,000", "5", ")", "EOF"]
    assert tokenize_program("table_max(net sales, none)") == ["table_max(", "net sales", "none", ")", "EOF"]


# ------------------------------------------------------------------------- execution rules


def test_literals_constants_percent_and_rounding():
    assert execute("divide(1, 3)", TABLE).value == 0.33333  # rounded to 5 decimals
    assert execute("add(1,000, 5%)", TABLE).value == 1000.05
    assert execute("multiply(const_m1, const_100)", TABLE).value == -100.0
    assert execute("greater(5, 3)", TABLE).value == "yes"
    assert execute("greater(3, 5)", TABLE).value == "no"
    assert execute("exp(2, 10)", TABLE).value == 1024.0
    assert execute("subtract(5829, 5735), divide(#0, 5735)", TABLE).value == round(94 / 5735, 5)


def test_table_cells_lose_dollar_and_parenthesised_parts():
    assert execute("table_sum(net sales, none)", TABLE).value == 5829 + 5735 + 5100
    assert execute("table_max(operating income, none)", TABLE).value == 1200.0  # "( 20% )" dropped
    assert execute("table_average(net sales, none)", TABLE).value == round((5829 + 5735 + 5100) / 3, 5)
    assert execute("table_min(net sales, none), divide(#0, const_100)", TABLE).value == 51.0
    assert execute("table_max(ratio, none)", TABLE).invalid  # "n/a" cell
    assert execute("table_max(no such row, none)", TABLE).reason == "no table row 'no such row'"
    assert execute("table_sum(empty, none)", TABLE).value == 0  # upstream: sum([]) is 0
    assert execute("table_max(empty, none)", TABLE).invalid


def test_upstream_reuses_previous_row_for_a_step_reference_in_a_table_op():
    # table_max(#0, none) never looks at #0: it reuses the last table row (upstream's behaviour).
    assert execute("table_min(net sales, none), table_max(#0, none)", TABLE).value == 5829.0
    assert execute("add(1, 2), table_max(#0, none)", TABLE).invalid  # no earlier row at all


def test_eof_is_dropped_unconditionally_and_structure_is_checked():
    assert execute(["add(", "1", "2", ")", "EOF"], TABLE).value == 3.0
    assert execute(["add(", "1", "2", ")", "anything"], TABLE).value == 3.0
    assert execute(["add(", "1", "2", ")"], TABLE).invalid  # ")" was taken as the EOF
    assert execute(["add(", "1", "2", "3", ")", "EOF"], TABLE).invalid  # three arguments
    assert execute(["add(", "1", ")", "EOF"], TABLE).invalid  # one argument
    assert execute(["EOF"], TABLE).invalid  # nothing to execute
    assert execute([], TABLE).invalid


@pytest.mark.parametrize(
    "program,reason",
    [
        ("divide(5, 0)", "division by zero"),
        ("exp(10, 100000)", "overflow"),
        ("add(#1, 2), add(1, 2)", "reference to a missing step"),
        ("add(#0, 2)", "reference to a missing step"),
        ("add(__import__('os').system('echo hacked'), 1)", "malformed program"),
        ("add(open, 1)", "not a number: 'open'"),
        ("exp(const_m1, 0.5)", "cannot compute (TypeError)"),  # complex result cannot be rounded
        ("multiply(greater(1, 2), 3)", "malformed program"),
    ],
)
def test_bad_programs_are_invalid_with_a_reason(program, reason):
    run = execute(program, TABLE)
    assert run.invalid and run.value is None
    assert run.reason == reason


def test_long_chains_and_doubling_finish_quickly():
    chain = ", ".join(["add(1, 2)"] + [f"add(#{i}, 1)" for i in range(3000)])
    assert execute(chain, TABLE).value == 3003.0
    # "yes" + "yes" doubles each step: upstream would exhaust memory; we stop at a bound.
    doubling = ", ".join(["greater(2, 1)"] + [f"add(#{i}, #{i})" for i in range(3000)])
    assert execute(doubling, TABLE).reason == "too large"
    deep = ", ".join(["add(1, 2)"] + [f"add(#{i}, #{i})" for i in range(3000)])
    assert equal_program("add(1, 2)", deep) is False


# ------------------------------------------------------------------------- program equivalence


def test_equivalence_is_symbolic_over_gold_literals():
    gold = "subtract(5829, 5735), divide(#0, 5735)"
    assert equal_program(gold, gold)
    assert equal_program("add(1, 2), add(#0, 3)", "add(2, 3), add(1, #0)")  # same sum, other order
    assert equal_program("multiply(2, 3), divide(#0, 4)", "divide(2, 4), multiply(#0, 3)")
    assert not equal_program(gold, "subtract(5735, 5829), divide(#0, 5735)")
    # Literal strings must match the gold's: "5,829" is another symbol than "5829".
    assert not equal_program(gold, "subtract(5,829, 5735), divide(#0, 5735)")
    assert execute("subtract(5,829, 5735), divide(#0, 5735)", TABLE).value == execute(gold, TABLE).value
    assert not equal_program(gold, "subtract(5829, 5735), divide(#1, 5735)")  # #k must point back
    assert not equal_program(gold, "")
    assert equal_program("greater(5, 3)", "greater(5, 3)")
    assert equal_program(
        "table_max(net sales, none), divide(#0, 2)", "table_max(net sales, none), divide(#0, 2)"
    )


def test_table_steps_match_only_at_the_same_first_or_later_position():
    # Upstream keys a table step by its "|"-joined string, which starts with "|" after the first step.
    gold = "table_sum(net sales, none), divide(#0, 3)"
    assert not equal_program(gold, "add(3, 3), table_sum(net sales, none), divide(#1, 3)")


# ------------------------------------------------------------------------- parsing model output


@pytest.mark.parametrize(
    "text,expected",
    [
        ("subtract(5829, 5735), divide(#0, 5735)", "subtract(5829, 5735), divide(#0, 5735)"),
        ("The program is: subtract(5829, 5735), divide(#0, 5735).", "subtract(5829, 5735), divide(#0, 5735)"),
        ("```\nadd(1, 2)\n```", "add(1, 2)"),
        ("Add(1,2) EOF", "add(1, 2)"),
        ("add(1, 2), add(#0, 3) so the answer is 6; check: add(9, 9)", "add(1, 2), add(#0, 3)"),
        ("table_max(net income, as reported, none)", "table_max(net income, as reported, none)"),
        ("add(1, 2)\ndivide(#0, 3)", "add(1, 2), divide(#0, 3)"),
    ],
)
def test_parse_generation_recovers_the_program(text, expected):
    assert program_to_string(parse_generation(text)) == expected
    assert parse_generation(text)[-1] == "EOF"


@pytest.mark.parametrize("text", ["", "I don't know.", "add(1", None, "<|eot_id|>", "divide(#0 5735"])
def test_parse_generation_of_garbage_is_an_empty_program(text):
    assert parse_generation(text) == ["EOF"]
    assert execute(parse_generation(text), TABLE).invalid


# ------------------------------------------------------------------------- never raises

_token = st.one_of(
    st.sampled_from([f"{op}(" for op in ALL_OPS] + [")", "EOF", "none", "#0", "#1", "#-1", "const_m1", "5%"]),
    st.sampled_from(
        ["net sales", "empty", "ratio", "const_x", "1,000", "(", "|", "#", "nan", "inf", "1e308"]
    ),
    st.text(max_size=8),
    st.integers(-5, 5).map(str),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_token, max_size=24), st.lists(_token, max_size=24))
def test_execute_and_equal_program_never_raise_on_token_lists(pred, gold):
    run = execute(pred, TABLE)
    assert run.invalid or run.value is not None
    assert isinstance(equal_program(gold, pred), bool)
    assert isinstance(equal_program(pred, gold), bool)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_never_raises_on_any_string(text):
    assert isinstance(execute(text, TABLE).invalid, bool)
    assert isinstance(equal_program("add(1, 2)", text), bool)
    assert parse_generation(text)[-1] == "EOF"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.none(), st.floats(), st.text(max_size=3)), max_size=10))
def test_never_raises_on_non_string_tokens(tokens):
    assert execute(tokens, TABLE).invalid in (True, False)
    assert equal_program(["add(", "1", "2", ")", "EOF"], tokens) in (True, False)
