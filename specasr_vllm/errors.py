"""The errors a user can cause, each with a message that names the fix.

Every layer raises these (never bare ValueError/RuntimeError for user mistakes) so the CLI can print
one line and exit non-zero, and the server can map each class to an HTTP status.
"""


class SpecASRError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is the whole message."""


class AudioDecodeError(SpecASRError):
    """The audio is corrupt, empty, or in a format nothing here can decode."""


class UnknownModelError(SpecASRError):
    """A model name resolves to nothing: not a known alias, local directory or reachable hub id."""


class MissingWeightsError(SpecASRError):
    """A known model's weights package is not installed."""


class InvalidRequestError(SpecASRError):
    """A parameter is out of range or inconsistent (bad language, method, batch, ...)."""


class AudioTooLongError(AudioDecodeError):
    """The audio is longer than the configured limit."""


class UnsupportedVLLMError(SpecASRError):
    """vLLM is missing, or a version the plugin's hooks were not written for."""
