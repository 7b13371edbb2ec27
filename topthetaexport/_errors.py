"""User-facing errors: one line that names the problem and the fix."""


class TopThetaError(Exception):
    """An error caused by the user's input or environment.

    The message is a single line naming what is wrong and how to fix it. The CLI prints it as
    ``error: <message>`` and exits with status 2; Python callers can catch it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
