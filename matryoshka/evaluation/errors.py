"""The one exception type of the evaluation package."""


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs (settings, reference, cache), explained in one line."""
