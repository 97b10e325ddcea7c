"""finqa-trl: teach Llama-family models to write executable FinQA programs with TRL + PEFT.

Kept import-light on purpose: `python -m finqa_trl.score` must not pull in torch.
"""

__version__ = "0.1.0"


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (an exception, or any text) as one line for a CLI error: whitespace runs become one space,
    cut to `limit` characters; an exception with no message gives its type's name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class OneLineError(Exception):
    """A problem the user can fix. `str()` is always one line (see one_line), fit for `error: <message>`."""

    def __init__(self, message: object) -> None:
        super().__init__(one_line(message))
