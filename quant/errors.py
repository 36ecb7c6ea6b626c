"""Typed errors. The CLI turns every `LlmError` into one clean line and a non-zero exit."""


class LlmError(Exception):
    """Base for every error a user can cause: bad files, bad options, missing models."""


class ModelFileError(LlmError):
    """A model file is missing, unreadable, truncated or not a GGUF."""


class UnsupportedError(LlmError):
    """The file is valid but uses an architecture or tensor type we do not run."""


class ModelNotFoundError(LlmError):
    """A model reference names nothing we can find."""


class PromptError(LlmError):
    """An empty prompt, or one that does not fit the context."""


class BackendError(LlmError):
    """A backend is unknown or cannot be loaded on this machine."""


class FieldError(LlmError):
    """A generation setting out of range, named by its field (`max_tokens`): the CLI words it as its flag
    (--max-tokens), the server as an HTTP 400 whose `param` is the field."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{field} {detail}")
