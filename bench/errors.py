"""How an exception is shown in a cell: its type and the first line of its message, shortened.

The harness never lets an implementation's exception stop a run; it stores this short text in the
cell instead (results.json keeps it whole, the table lists it under a numbered marker).
"""

MAX_ERROR_CHARS = 200


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``, at most MAX_ERROR_CHARS characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
