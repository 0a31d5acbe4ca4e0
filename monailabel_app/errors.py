"""Errors that mean "the request was wrong", as opposed to a fault of the server.

The MONAI Label app turns :class:`InputError` into an HTTP 4xx whose body is the message, and the CLI
prints the message and exits with status 2. Messages say what was wrong and, where it helps, what would
be right.
"""


class InputError(ValueError):
    """The input (image, parameters, question) cannot be served; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
