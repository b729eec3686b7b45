"""Render a model's own chat template (Jinja, sandboxed) and tokenize the result safely.

The rendered prompt mixes trusted text (the template's ``<|im_start|>``-style control
tokens) with user text that may *look* like control tokens. Before rendering, every
special-token string inside the messages is swapped for a private-use placeholder;
after rendering, control tokens are parsed only in what is left, and the placeholders
go back as plain text (see ``Tokenizer.encode_trusted``). So the ids are exactly those of ``apply_chat_template`` for
honest input, and injected control-token text stays ordinary text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenguard.errors import InvalidRequest, TokenGuardError

# Private-use characters frame a placeholder: \ue000 <index> \ue001.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class ChatTemplateError(TokenGuardError):
    """The chat template failed to render, or the tokenizer has none."""


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates use to
    mark the assistant's text (for training masks): here it renders what it holds."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it so

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    # The environment transformers renders chat templates in: loop controls, the
    # generation tag, tojson with json.dumps' keywords.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, "jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


class RenderedChat:
    """A rendered prompt whose user text is hidden behind placeholders."""

    __slots__ = ("_originals", "text")

    def __init__(self, text: str, originals: list[str]) -> None:
        self.text = text
        self._originals = originals

    def restore(self, piece: str) -> str:
        """``piece`` of :attr:`text` with the user's original strings put back."""
        if not self._originals:
            return piece
        return _PLACEHOLDER.sub(lambda m: self._originals[int(m.group(1))], piece)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    special_tokens: Iterable[str],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template_vars: Mapping[str, Any] | None = None,
) -> RenderedChat:
    """Render ``messages`` (and ``tools``, as transformers hands them) through
    ``template`` with every string in ``special_tokens`` (and the placeholder characters
    themselves) hidden inside them.

    Content reaches the template as text, as vLLM gives it to templates that expect
    text: ``None`` (an assistant message that only calls tools) as ``""``, a list of
    text parts as their texts joined by line breaks. An openai SDK object (a tool call
    as the client returned it) goes in as its dict, escaped like the rest.
    """
    originals: list[str] = []
    needles = sorted({*special_tokens, _OPEN, _CLOSE}, key=len, reverse=True)
    needle_pattern = re.compile("|".join(map(re.escape, needles)))

    def hide(match: re.Match[str]) -> str:
        originals.append(match.group())
        return f"{_OPEN}{len(originals) - 1}{_CLOSE}"

    def escape(value: Any) -> Any:
        if isinstance(value, str):
            return needle_pattern.sub(hide, value)
        if isinstance(value, Mapping):  # keys too: tojson writes them (a tool's parameter names)
            return {escape(k) if isinstance(k, str) else k: escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if callable(getattr(value, "model_dump", None)):  # a pydantic object: the openai SDK's types
            return escape(value.model_dump(exclude_none=True))
        raise InvalidRequest(f"a chat template is given text, numbers, lists and dicts, not {type(value).__name__}")

    try:
        text = _compile(template).render(
            messages=[escape({**m, "content": _content_as_text(m.get("content"))}) for m in messages],
            tools=escape(list(tools)) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **(template_vars or {}),
        )
    except (ChatTemplateError, InvalidRequest):
        raise
    except Exception as e:  # a template is model-supplied code: surface any failure as ours
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
    return RenderedChat(text, originals)


def _content_as_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequest(f"a local model's prompt holds text parts only, not a {kind!r} part")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(f"message content must be text or a list of parts, got {type(content).__name__}")
