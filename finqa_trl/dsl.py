"""The FinQA program language: tokenizing, executing and comparing programs exactly as upstream does.

Upstream's `code/evaluate/evaluate.py` (czyssrs/FinQA) defines the published metrics through a
handful of string manipulations, and several of its rules are surprising: programs are joined
with "|" and cut at every ")", a step's op and arguments come from splitting that string, the final
value is rounded to 5 decimals and compared with `==`, and program equivalence maps each *gold
literal string* (and each whole gold table step string) to a sympy symbol. To give numbers identical
to upstream's on every input we follow those string rules step by step instead of parsing into a
cleaner grammar; each quirk that changes an outcome is named in a comment.

Where upstream crashes (an assert, a malformed gold program) or never finishes (exponentially large
expressions), we return "invalid" / "not equal" instead, in bounded time. Nothing here calls
`eval`/`exec`; arithmetic happens on Python floats exactly as upstream's does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

ARITH_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater")
TABLE_OPS = ("table_max", "table_min", "table_sum", "table_average")
ALL_OPS = ARITH_OPS + TABLE_OPS
NA = "n/a"

# Bounds that only bite where upstream itself would exhaust memory or recursion: "yes"/"no" results
# concatenated by `add` double in size per step, and symbolic expressions double when a step
# references the same earlier step twice. Real programs are a few hundred characters at most.
MAX_STRING_VALUE = 1 << 20
MAX_EXPRESSION_CHARS = 10_000

Value = float | int | complex | str


class Execution(NamedTuple):
    """Result of running a program: `value` is a float (rounded to 5 decimals), "yes"/"no", or None."""

    invalid: bool
    value: Value | None
    reason: str = ""


# --------------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_program(program: str) -> list[str]:
    """Upstream's `program_tokenization`: a program string -> official token list ending in "EOF".

    Steps are separated by ", " (comma + space), so a literal "1,000" stays one token while a row name
    containing ", " is cut in two — exactly as upstream tokenizes gold programs.
    """
    tokens: list[str] = []
    for part in program.split(", "):
        cur = ""
        for c in part:
            if c == ")" and cur:
                tokens.append(cur)
                cur = ""
            cur += c
            if c in "()":
                tokens.append(cur)
                cur = ""
        if cur:
            tokens.append(cur)
    tokens.append("EOF")
    return tokens


def program_to_string(tokens: Sequence[str]) -> str:
    """Official token list -> the program string FinQA writes (`subtract(5829, 5735), divide(#0, 5735)`)."""
    body = list(tokens[:-1]) if tokens and tokens[-1] == "EOF" else list(tokens)
    out, step = [], []
    for tok in body:
        step.append(str(tok))
        if tok == ")":
            out.append(step[0] + ", ".join(step[1:-1]) + ")")
            step = []
    if step:  # a trailing incomplete step is kept verbatim so nothing silently disappears
        out.append(step[0] + ", ".join(step[1:]))
    return ", ".join(out)


def as_tokens(program: str | Sequence[str]) -> list[Any]:
    """Accept a program string or an official token list."""
    return tokenize_program(program) if isinstance(program, str) else list(program)


# Model output -> official tokens. Models wrap programs in prose, code fences or quotes, drop "EOF",
# add a full stop; only the chain of steps matters.
_STEP_RE = re.compile(r"\b(" + "|".join(sorted(ALL_OPS, key=len, reverse=True)) + r")\s*\(([^()]*)\)", re.I)
_SEPARATOR_RE = re.compile(r"^[\s,;]*$")


def parse_generation(text: str) -> list[str]:
    """Pull the first chain of program steps out of free text; return official tokens ending in "EOF".

    Text with no recognisable step gives ["EOF"], which executes to nothing (invalid) — never an error.
    """
    if not isinstance(text, str):
        return ["EOF"]
    tokens: list[str] = []
    last_end = None
    for m in _STEP_RE.finditer(text):
        if last_end is not None and not _SEPARATOR_RE.match(text[last_end : m.start()]):
            break  # prose between steps ends the program: keep the first chain only
        op, inner = m.group(1).lower(), m.group(2).strip()
        args = [a.strip() for a in (inner.split(", ") if ", " in inner else inner.split(","))]
        if op in TABLE_OPS and len(args) > 2 and args[-1].lower() == "none":
            args = [", ".join(args[:-1]), "none"]  # a row name that itself contains ", "
        tokens += [op + "(", *args, ")"]
        last_end = m.end()
    return tokens + ["EOF"]


# --------------------------------------------------------------------------------------------------
# Executing


def str_to_num(text: str) -> float | str:
    """Upstream's `str_to_num`: commas stripped, "x%" -> x/100, "const_N" -> N ("const_m1" -> -1).

    Python's float() is the parser, as upstream's, so "1e3", " 5 " and "nan" parse too. A malformed
    constant raises ValueError, which the callers turn into "invalid" as upstream's try/except does.
    """
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        if "%" in text:
            try:
                return float(text.replace("%", "")) / 100.0
            except ValueError:
                return NA
        if "const" in text:
            text = text.replace("const_", "")
            return float("-1" if text == "m1" else text)
        return NA


def _row_numbers(row: Sequence[str]) -> list[float] | str:
    """Upstream's `process_row`: each cell loses "$" and everything from "(" before parsing."""
    out = []
    for cell in row:
        num = str_to_num(cell.replace("$", "").strip().split("(")[0].strip())
        if num == NA:
            return NA
        out.append(num)
    return out


class _Invalid(Exception):
    pass


def _split_step(step: str) -> tuple[str, str, str]:
    """op, arg1, arg2 of one "|"-joined step, by upstream's string rules (IndexError -> invalid)."""
    parts = step.split("(")
    op = parts[0].strip("|").strip()
    args = parts[1].strip("|").strip().split("|")
    return op, args[0].strip(), args[1].strip()


def _structure_ok(body: Sequence[Any]) -> bool:
    # Upstream checks only every 4th token (an op) and every 4th+3 (")"); arguments are unchecked.
    for ind, token in enumerate(body):
        if ind % 4 == 0 and token.strip("(") not in ALL_OPS:
            return False
        if (ind + 1) % 4 == 0 and token != ")":
            return False
    return True


def execute(program: str | Sequence[str], table: Sequence[Sequence[str]]) -> Execution:
    """Run a program (string or official token list) against a table with upstream's rules.

    Never raises; any input finishes in time linear in its length.
    """
    try:
        return _execute(as_tokens(program), table)
    except (_Invalid, ArithmeticError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return Execution(True, None, _reason(e))
    except (RecursionError, MemoryError):
        return Execution(True, None, "too large")
    except Exception as e:  # the contract is "a value or invalid", whatever arrives
        return Execution(True, None, _reason(e))


def _reason(e: BaseException) -> str:
    if isinstance(e, _Invalid):
        return str(e)
    if isinstance(e, ZeroDivisionError):
        return "division by zero"
    if isinstance(e, OverflowError):
        return "overflow"
    if isinstance(e, KeyError):
        return "reference to a missing step"
    if isinstance(e, IndexError):
        return "step without two arguments"
    return f"cannot compute ({type(e).__name__})"


def _execute(tokens: list[Any], table: Sequence[Sequence[str]]) -> Execution:
    body = tokens[:-1]  # upstream drops the last token unconditionally, "EOF" or not
    if not _structure_ok(body):
        raise _Invalid("malformed program")
    steps = "|".join(body).split(")")[:-1]
    results: dict[int, Value] = {}
    value: Value = NA
    table_rows: dict[str, Sequence[str]] | None = None
    row_nums: list[float] | str | None = None  # upstream keeps this across steps (see below)

    def operand(arg: str) -> Value:
        if "#" in arg:
            return results[int(arg.replace("#", ""))]
        num = str_to_num(arg)
        if num == NA:
            raise _Invalid(f"not a number: {arg!r}")
        return num

    for ind, step in enumerate(steps):
        step = step.strip()
        if len(step.split("(")) > 2:
            raise _Invalid("malformed program")
        op, arg1, arg2 = _split_step(step)
        if op in ARITH_OPS:
            a, b = operand(arg1), operand(arg2)
            if op == "add":
                value = a + b  # "yes" + "no" concatenates, as in upstream
                if isinstance(value, str) and len(value) > MAX_STRING_VALUE:
                    raise _Invalid("too large")
            elif op == "subtract":
                value = a - b
            elif op == "multiply":
                value = a * b
            elif op == "divide":
                value = a / b
            elif op == "exp":
                value = a**b  # float ** float: bounded time; overflow raises, negative base -> complex
            else:
                value = "yes" if a > b else "no"
            results[ind] = value
        elif "table" in op:
            if table_rows is None:
                table_rows = {row[0]: row[1:] for row in table}  # later duplicate row names win
            if "#" in arg1:
                # Upstream never recomputes the row here: it reuses the previous table step's numbers
                # (or fails when there was none). We keep that.
                _ = results[int(arg1.replace("#", ""))]
            else:
                if arg1 not in table_rows:
                    raise _Invalid(f"no table row {arg1!r}")
                row_nums = _row_numbers(table_rows[arg1])
            if row_nums is None or row_nums == NA:
                raise _Invalid("table row is not numeric")
            if op == "table_max":
                value = max(row_nums)
            elif op == "table_min":
                value = min(row_nums)
            elif op == "table_sum":
                value = sum(row_nums)
            elif op == "table_average":
                value = sum(row_nums) / len(row_nums)
            results[ind] = value
        # Any other op string (possible after upstream's ")"-splitting) leaves the step without a result.
    if value == NA:
        return Execution(True, None, "empty program")
    if value not in ("yes", "no"):
        value = round(value, 5)  # complex/str raise TypeError -> invalid, as upstream
    return Execution(False, value)


def answers_match(value: Value | None, exe_ans: Any) -> bool:
    """Upstream's `exe_res == gold_res` (after rounding to 5 decimals in `execute`)."""
    return value is not None and value == exe_ans


# --------------------------------------------------------------------------------------------------
# Program equivalence


def equal_program(gold: str | Sequence[str], pred: str | Sequence[str]) -> bool:
    """Upstream's `equal_program(gold, pred)`: the two programs are symbolically the same expression.

    Each gold literal string and each whole gold table step becomes a symbol; the prediction may use
    only those (so "5,829" and "5829" differ), its `#k` must point backwards, and both become
    expressions from their last step, compared after `sympy.simplify`. Identical expressions
    short-circuit, expressions that differ at an exact rational point are unequal without sympy, and
    simplify results are cached. Never raises.
    """
    try:
        gold_t, pred_t = as_tokens(gold), as_tokens(pred)
        g = _gold_symbols(tuple(gold_t))
        if g is None:
            return False
        sym_map, gold_expr = g
        pred_expr = _pred_expression(pred_t, sym_map)
        if pred_expr is None:
            return False
        return _expressions_equal(gold_expr, pred_expr)
    except Exception:
        return False


Expr = tuple  # ("sym", name) | (op, left, right)


@lru_cache(maxsize=4096)
def _gold_symbols(gold: tuple[Any, ...]) -> tuple[dict[str, str], Expr] | None:
    steps = "|".join(gold[:-1]).split(")")[:-1]
    sym_map: dict[str, str] = {}
    step_dict: dict[int, str] = {}
    try:
        for ind, step in enumerate(steps):
            step = step.strip()
            if len(step.split("(")) > 2:
                return None  # upstream asserts here
            op, arg1, arg2 = _split_step(step)
            step_dict[ind] = step
            # Note: `step` keeps a leading "|" for every step but the first, so a table step only
            # matches a prediction's table step at the same "first or not" position — upstream's rule.
            keys = [step] if "table" in op else [a for a in (arg1, arg2) if "#" not in a]
            for key in keys:
                if key not in sym_map:
                    sym_map[key] = f"a{len(sym_map)}"
        return sym_map, _build(steps[-1].strip(), step_dict, sym_map)
    except (IndexError, KeyError, ValueError, _Invalid, RecursionError):
        return None


def _pred_expression(pred: list[Any], sym_map: Mapping[str, str]) -> Expr | None:
    body = pred[:-1]
    if not _structure_ok(body):
        return None
    steps = "|".join(body).split(")")[:-1]
    step_dict: dict[int, str] = {}
    for ind, step in enumerate(steps):
        step = step.strip()
        if len(step.split("(")) > 2:
            return None
        op, arg1, arg2 = _split_step(step)
        step_dict[ind] = step
        if "table" in op:
            if step not in sym_map:
                return None
            continue
        for arg in (arg1, arg2):
            if "#" not in arg:
                if arg not in sym_map:
                    return None
            elif int(arg.strip("#")) >= ind:
                return None
    return _build(steps[-1].strip(), step_dict, sym_map)


_INFIX = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/", "exp": "**", "greater": ">"}


def _build(step: str, step_dict: Mapping[int, str], sym_map: Mapping[str, str]) -> Expr:
    """Upstream's `symbol_recur`, memoised and size-bounded (it is exponential on shared references)."""
    memo: dict[str, tuple[Expr, int]] = {}

    def rec(step: str, depth: int) -> tuple[Expr, int]:
        if step in memo:
            return memo[step]
        if depth > 900:  # upstream's recursion would overflow Python's stack around here
            raise _Invalid("too deep")
        op, arg1, arg2 = _split_step(step)
        if "table" in op:
            out = (("sym", sym_map[step]), 2)
        elif op not in _INFIX:
            raise _Invalid("unknown op")  # upstream: None in a string concatenation -> not equal
        else:
            parts = []
            for arg in (arg1, arg2):
                if "#" in arg:
                    parts.append(rec(step_dict[int(arg.replace("#", ""))].strip(), depth + 1))
                else:
                    parts.append((("sym", sym_map[arg]), 2))
            size = parts[0][1] + parts[1][1] + 8
            if size > MAX_EXPRESSION_CHARS:
                raise _Invalid("too large")
            out = ((op, parts[0][0], parts[1][0]), size)
        memo[step] = out
        return out

    return rec(step, 0)[0]


def _to_str(e: Expr) -> str:
    # The exact string upstream hands to sympy, e.g. "( ( a0 - a1 ) / a1 )".
    if e[0] == "sym":
        return e[1]
    return f"( {_to_str(e[1])} {_INFIX[e[0]]} {_to_str(e[2])} )"


# A fixed generic point: distinct non-integer rationals, so no two symbols coincide and an integer
# exponent can only come from the structure of the expression itself.
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


def _point(name: str) -> Fraction:
    i = int(name[1:])
    return Fraction(_PRIMES[i % len(_PRIMES)] * (i // len(_PRIMES) + 1) + 1, 2 * i + 3) + Fraction(1, 7)


def _exact(e: Expr) -> Fraction | None:
    """Exact value at the generic point, or None where it cannot decide (relations, powers, 1/0)."""
    if e[0] == "sym":
        return _point(e[1])
    op = e[0]
    if op == "greater":
        return None
    a, b = _exact(e[1]), _exact(e[2])
    if a is None or b is None:
        return None
    if op == "add":
        v = a + b
    elif op == "subtract":
        v = a - b
    elif op == "multiply":
        v = a * b
    elif op == "divide":
        v = a / b if b else None
    elif b.denominator != 1 or abs(b) > 16 or (b < 0 and a == 0):  # exp: only small integer powers
        v = None
    else:
        v = a ** int(b)
    # Nested powers can grow numbers without bound; past this size let sympy decide.
    if v is not None and max(v.numerator.bit_length(), v.denominator.bit_length()) > 4096:
        return None
    return v


def _expressions_equal(gold: Expr, pred: Expr) -> bool:
    gold_s, pred_s = _to_str(gold), _to_str(pred)
    if gold_s == pred_s:
        # Same input to a deterministic simplify, so equal — unless sympy fails on it, which only a
        # relation nested in arithmetic or a comparison with 1/0 can cause: those pay for the call.
        plain = " > " not in gold_s or (
            gold[0] == "greater"
            and gold_s.count(" > ") == 1
            and _exact(gold[1]) is not None
            and _exact(gold[2]) is not None
        )
        return plain or _simplified(gold_s) is not None
    ga, pa = _exact(gold), _exact(pred)
    if ga is not None and pa is not None and ga != pa:
        # simplify() preserves value, so expressions differing at a point where both are defined can
        # never be structurally equal afterwards: no need to pay for sympy.
        return False
    g, p = _simplified(gold_s), _simplified(pred_s)
    return g is not None and p is not None and g == p


@lru_cache(maxsize=8192)
def _simplified(expr: str) -> Any:
    from sympy import simplify  # lazy: sympy costs ~0.4 s to import and most scoring never needs it

    try:
        # `evaluate=False` is what upstream passes; sympy's simplify ignores it, and so do we.
        return simplify(expr, evaluate=False)
    except Exception:
        return None
