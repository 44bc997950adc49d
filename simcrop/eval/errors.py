"""The evaluation layer's one error type."""


class EvalError(Exception):
    """A problem with the evaluation's inputs; the message is one line naming the file or option."""
