"""OpenAI's error bodies, worded as OpenAI words them (see /work/shared/PROVIDERS.md)."""

from __future__ import annotations

from routerd.mock import openai_wire as wire

# The model faults that answer with an error status, by fault name.
SERVER_FAULTS: dict[str, tuple[int, wire.ErrorDetail]] = {
    "503": (
        503,
        wire.ErrorDetail(
            "The engine is currently overloaded, please try again later.", "server_error"
        ),
    ),
    "500": (
        500,
        wire.ErrorDetail(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        ),
    ),
    "529": (
        529,
        wire.ErrorDetail(
            "The server is overloaded, please try again later.", "server_error", None, "overloaded"
        ),
    ),
}


def mask_key(secret: str) -> str:
    """The key as OpenAI quotes it back: first 5 and last 2 characters, the rest starred."""
    # A short key would be mostly revealed by its ends; quote none of it.
    if len(secret) < 10:
        return "*" * len(secret)
    return secret[:5] + "*" * (len(secret) - 7) + secret[-2:]


def missing_key() -> wire.ErrorDetail:
    """401 for a request without a bearer key."""
    return wire.ErrorDetail(
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
    )


def invalid_key(secret: str) -> wire.ErrorDetail:
    """401 for a key the mock never issued or has revoked; quotes only its ends."""
    return wire.ErrorDetail(
        f"Incorrect API key provided: {mask_key(secret)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    )


def no_quota() -> wire.ErrorDetail:
    """429 for a key whose account is out of money: retrying will not help."""
    return wire.ErrorDetail(
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        None,
        "insufficient_quota",
    )


def model_not_found(model: str) -> wire.ErrorDetail:
    """404 for a model the mock does not serve."""
    return wire.ErrorDetail(
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    )


def context_exceeded(window: int, tokens: int) -> wire.ErrorDetail:
    """400 for a prompt longer than the model's context window."""
    return wire.ErrorDetail(
        f"This model's maximum context length is {window} tokens. However, your messages "
        f"resulted in {tokens} tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    )
