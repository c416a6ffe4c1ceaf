"""The error every training step raises for a run that cannot continue (printed as one line, no traceback)."""


class TrainingError(RuntimeError):
    """A run that cannot continue, with a message for the user (no traceback needed)."""
