"""The error every part of the evaluation raises for a problem with its inputs."""


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs, reported to the user as one line (exit status 2)."""
