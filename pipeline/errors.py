"""The base of every error the pipeline explains to its user (the CLI prints these without a traceback).

Kept free of heavy imports, so catching it does not import MLflow, Optuna or torch.
"""


class PipelineError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


def masked(text: str) -> str:
    """A URL, or a message holding one, with its password shown as ***: `user:pw@host` and `password=pw`."""
    import re

    text = re.sub(r"(//[^:/@\s]+):[^@\s]*@", r"\1:***@", text)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)
