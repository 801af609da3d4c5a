"""The message that a bad-input row checks (``tests/test_bad_inputs*.py``): ``(id, call, pattern)``."""
import contextlib
import logging


def message(call, tmp_path) -> str:
    """What ``call(tmp_path)`` tells the user: ``"<ExceptionType>: <message>"`` when it raises,
    else the text it returns."""
    try:
        out = call(tmp_path)
    except Exception as e:  # noqa: BLE001 -- the message is what is tested
        return f"{type(e).__name__}: {e}"
    return out if isinstance(out, str) else f"returned {out!r}"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def warning_lines(*loggers):
    """The list of warnings ``loggers`` (default: fvcore, ap_loss_d2, detectron2) log inside."""
    handler = _Capture()
    loggers = [logging.getLogger(n) for n in loggers or ("fvcore", "ap_loss_d2", "detectron2")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.lines
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def captured_warnings(fn, *loggers):
    """Run fn(); return its warnings (from ``loggers``) joined, then ``result=<fn's result>``."""
    with warning_lines(*loggers) as lines:
        result = fn()
    return "\n".join(lines) + f"\nresult={result}"
