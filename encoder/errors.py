"""The one exception type for bad user input: CLIs print its message as one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's content). The message names the problem and the fix."""


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
