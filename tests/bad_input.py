"""The message that a bad-input row checks (``tests/test_bad_inputs*.py``): ``(id, call, pattern)``."""


def message(call, tmp_path) -> str:
    """What ``call(tmp_path)`` tells the user: ``"<ExceptionType>: <message>"`` when it raises,
    else the text it returns."""
    try:
        out = call(tmp_path)
    except Exception as e:  # noqa: BLE001 -- the message is what is tested
        return f"{type(e).__name__}: {e}"
    return out if isinstance(out, str) else f"returned {out!r}"
