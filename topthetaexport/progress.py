"""The one progress protocol: the library emits ``(stage, message, fraction of that stage done)``; the CLI renders.

Every long-running function takes ``progress: Progress | None`` and reports through :func:`emitter`.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, str, float], None]
StageReporter = Callable[[str, float], None]


def emitter(progress: Progress | None, stage: str) -> StageReporter:
    """A ``(message, fraction)`` reporter bound to ``stage``; silent when ``progress`` is None."""
    if progress is None:
        return lambda message, fraction: None
    return lambda message, fraction: progress(stage, message, fraction)
