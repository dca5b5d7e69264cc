"""Errors a user can hit. Each message says what happened, what was expected, and what to do next."""


def describe_value(value: object) -> str:
    """`value` as JSON-ish text, cut short: error messages quote what they refuse."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class EdgeVLMError(Exception):
    """Base class of edgevlm's own errors."""


class ImageError(EdgeVLMError, ValueError):
    """An image could not be read or is not usable (missing, a directory, not an image, truncated, too large)."""


class ImageTooLargeError(ImageError):
    """An image, or a request's images together, above a pixel cap (`edgevlm.images.ImageLimits`), refused from the
    headers before decoding."""


class BundleError(EdgeVLMError):
    """A bundle is missing, incomplete, corrupt, or of a format this version cannot read."""


class UnsupportedModelError(EdgeVLMError, ValueError):
    """A model whose architecture no exporter supports."""


class ProfileError(EdgeVLMError, ValueError):
    """A hardware profile that is unknown, invalid, asks for what this machine lacks (`strict`), or does not fit."""


class ExportValidationError(EdgeVLMError):
    """An exported graph or file disagrees with the PyTorch reference beyond its tolerance."""

    def __init__(self, what: str, max_abs_diff: float, atol: float, why: str | None = None):
        """`why` replaces the default reason, that the difference exceeds the tolerance."""
        self.what, self.max_abs_diff, self.atol = what, max_abs_diff, atol
        super().__init__(f"{what}: {why or f'max abs difference {max_abs_diff:.3g} exceeds the tolerance {atol:.3g}'}")


class BudgetError(EdgeVLMError, ValueError):
    """Token-budget limits that are invalid, contradict each other or the model, or cannot all be met."""


class ContextOverflowError(EdgeVLMError, ValueError):
    """Prompt, image tokens and requested new tokens do not fit in the context window."""


class RequestError(EdgeVLMError, ValueError):
    """A chat request that is malformed: messages, parameters or response_format of the wrong shape or value."""


class GrammarError(RequestError):
    """A grammar (raw GBNF, or one made from a JSON schema) that llama.cpp cannot parse."""


class ImageNotAllowedError(ImageError):
    """An image source the caller's policy refuses: a remote URL, or a local path outside the allowed directory."""


class ModelClosedError(EdgeVLMError):
    """A loaded model used after `close()`."""


class ServerSettingsError(EdgeVLMError, ValueError):
    """Server settings that are invalid: an empty API key, a limit or timeout that is not positive."""
