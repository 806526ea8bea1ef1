"""The one exception type for bad user input: CLIs print its message as one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's content). The message names the problem and the fix."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""
