"""The base of every error the pipeline explains to its user (the CLI prints these without a traceback).

Kept free of heavy imports, so catching it does not import MLflow, Optuna or torch.
"""


class PipelineError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and most schedulers send before killing a job), raised where the main thread is,
    so it unwinds exactly like Ctrl-C: the run ends KILLED with failure_reason=interrupted, the checkpoint
    on disk stays the last complete epoch, and the command exits 143 (128 + SIGTERM)."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into Terminated in this process (call from the main thread, once)."""
    import signal

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def masked(text: str) -> str:
    """A URL, or a message holding one, with its password shown as ***: `user:pw@host` and `password=pw`."""
    import re

    text = re.sub(r"(//[^:/@\s]+):[^@\s]*@", r"\1:***@", text)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)
