"""The OpenAI request bodies camelid serves, as pydantic models, and what becomes of every field.

Each field of OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` request schemas is in
exactly one of three tables: honoured (it changes the answer as OpenAI documents), ignored (it
cannot change the answer: an end-user id, a billing tier, a caching hint) or rejected (camelid
cannot do what it asks, so a 400 names it rather than answering a different request than was
asked). A rejected field is still accepted at its neutral value (``tools: []``,
``response_format: {"type": "text"}``, ``best_of: 1``), since that asks for nothing. A field
in no table is refused as unknown. Types are strict (``"0.5"`` is not a temperature), as
:class:`camelid.SamplingParams` is.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)


class _Body(BaseModel):
    # Unknown fields are refused (extra="forbid"), types are not coerced (strict).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # a padding field of OpenAI's: ignored


Stop = StrictStr | list[StrictStr] | None


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: StrictStr
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Any] | None = None
    # camelid / vLLM extras
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    truncate_prompt_tokens: StrictInt | None = None


TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: StrictInt | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(_Body):
    type: StrictStr
    text: StrictStr | None = None
    # Other part types (image_url, input_audio, file) are refused by name in the app.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class Message(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    # accepted and ignored
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: Any = None
    safety_identifier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    # rejected unless neutral
    store: StrictBool | None = None
    modalities: list[StrictStr] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None


# ------------------------------------------------------------------------- what each field does
_SHARED_HONOURED = (
    "model n seed stop stream stream_options temperature top_p presence_penalty frequency_penalty"
).split()
EXTRAS = "top_k min_p repetition_penalty ignore_eos stop_token_ids truncate_prompt_tokens".split()

COMPLETION_HONOURED = frozenset([*_SHARED_HONOURED, "prompt", "max_tokens", "echo", "logprobs"])
CHAT_HONOURED = frozenset(
    [*_SHARED_HONOURED, "messages", "max_tokens", "max_completion_tokens", "logprobs",
     "top_logprobs"]
)  # fmt: skip

# name -> why it cannot change the answer
IGNORED = {
    "user": "an end-user id for OpenAI's abuse monitoring; nothing to monitor here",
    "metadata": "tags for stored completions; nothing is stored",
    "service_tier": "a billing tier; one tier here",
    "prompt_cache_key": "a caching hint; camelid's prefix cache needs none",
    "prompt_cache_retention": "a caching hint; camelid's prefix cache needs none",
    "prompt_cache_options": "a caching hint; camelid's prefix cache needs none",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "parallel_tool_calls": "only means something with tools, which are refused",
}
COMPLETION_IGNORED = frozenset({"user"})
CHAT_IGNORED = frozenset(IGNORED)

# name -> (the values that ask for nothing, why anything else is refused)
REJECTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((None, 1), "best_of is not supported (generate n choices instead)"),
    "suffix": ((None, ""), "suffix (fill-in-the-middle) is not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "store": ((None, False), "store is not supported: completions are not stored"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "response_format": (
        (None, {"type": "text"}),
        "response_format is not supported (no JSON or schema-constrained output yet)",
    ),
    "tools": ((None, []), "tools are not supported"),
    "tool_choice": ((None, "none"), "tool_choice is not supported (no tools)"),
    "functions": ((None, []), "functions are not supported"),
    "function_call": ((None, "none"), "function_call is not supported (no functions)"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported (not a reasoning model)"),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "moderation": ((None,), "moderation is not supported"),
}
COMPLETION_REJECTED = frozenset({"best_of", "suffix", "logit_bias"})
CHAT_REJECTED = frozenset(set(REJECTED) - {"best_of", "suffix"})


def rejected_field(body: BaseModel, names: frozenset[str]) -> tuple[str, str] | None:
    """The first field of ``names`` set to something camelid cannot do: (name, why)."""
    for name in sorted(names):
        value = getattr(body, name)
        neutral, why = REJECTED[name]
        if not any(value == v and type(value) is type(v) for v in neutral):
            return name, why
    return None


def fields_of(model: type[BaseModel]) -> frozenset[str]:
    """Every field name a request body may carry."""
    return frozenset(model.model_fields)


ROLES = ("system", "developer", "user", "assistant")
ROLE_OF = {"developer": "system"}  # OpenAI's newer name for the system role
