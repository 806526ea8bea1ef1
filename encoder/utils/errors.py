"""The one exception type for bad user input: CLIs print its message as one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's content). The message names the problem and the fix.

    Raised in a DataLoader worker (an image decoded in `__getitem__`), it still carries its own message in the
    main process. torch sends the worker's exception over as its type and formatted traceback and re-raises
    `type(text)` with text "Caught UserError in DataLoader worker process N.\nOriginal Traceback (most recent call
    last): ...\n<module>.UserError: <message>"; the constructor recognises that text and takes the message back.
    The recovery lives here, not in `cli_support.run_cli`'s printing, because the constructor is the one place
    every re-raise goes through: `str(err)` is then the user's line for any catcher (a trainer that prefixes the
    message, a log, a test), not only for the CLI, and every subclass (TrainingDiverged, ...) keeps its type.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _worker_message(text: str, cls: type) -> str:
    """The original message inside torch's ExceptionWrapper text for an exception of type `cls`; `text` itself
    when it is no such text."""
    if not (text.startswith(f"Caught {cls.__name__} ") and "\nOriginal Traceback" in text):
        return text
    # The traceback ends with the exception's own block (after any "The above exception was the direct cause"
    # blocks of its causes): frame lines, all indented, then "<module>.<qualname>: <message>" (the module left out
    # for __main__ and builtins), the message possibly over several lines.
    last = text.rfind("Traceback (most recent call last):\n")
    name = cls.__qualname__ if cls.__module__ in ("__main__", "builtins") else f"{cls.__module__}.{cls.__qualname__}"
    lines = text[last:].split("\n")[1:]
    for n, line in enumerate(lines):
        if line == name or line.startswith(name + ": "):
            return "\n".join([line[len(name) + 2:], *lines[n + 1:]]).rstrip("\n")
        if line and not line[0].isspace():
            break
    tail = text.rstrip().rsplit("\n", 1)[-1]  # an unexpected layout: the last line, where Python puts the message
    return tail.partition(": ")[2] or tail


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


class NonFiniteValues(UserError):
    """Embeddings, scores or router logits hold NaN or inf: any number computed from them would be meaningless."""


def require_finite(tensor, what: str) -> None:
    """Raise NonFiniteValues naming `what` and how many rows are affected, instead of scoring garbage.

    NaN compares False with everything, so a rank counted as `scores >= best` is 0 for a NaN score: without
    this check a model with one NaN weight reports perfect recall.
    """
    finite = tensor.isfinite()
    if bool(finite.all()):
        return
    rows = finite.reshape(finite.shape[0], -1).all(dim=1) if finite.dim() > 0 else finite.reshape(1)
    raise NonFiniteValues(f"{what}: {int((~rows).sum())} of {rows.numel()} rows are NaN or infinite, so no metric "
                          "can be computed; the model's weights or its inputs hold non-finite values (a diverged "
                          "checkpoint?): evaluate an earlier checkpoint or retrain")


def first_line(err: BaseException | None, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when the message is empty), for quoting a library's
    error inside a one-line UserError: library messages often go on for lines (tracebacks, hints) that would break
    the one-line rule. `with_type` prefixes the type name ("EOFError: ..."), for errors whose message alone says
    little ("unexpected EOF")."""
    text = str(err).strip() if err is not None else ""
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    return f"{type(err).__name__}: {line}" if with_type else line
