"""Tokenizers of local models: plain-text encoding plus the model's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenguard.tokens.base import Message, Tokenizer, check_messages, check_tools
from tokenguard.tokens.chat_template import ChatTemplateError, RenderedChat, render_chat


class TemplatedTokenizer(Tokenizer):
    """A tokenizer that knows its model's chat template, BOS and EOS.

    Subclasses set the attributes below in ``__init__``. :meth:`encode_chat` gives the
    exact ids the model is fed; :meth:`count_messages` is their length.
    """

    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    #: Prepend BOS to a chat prompt when the template does not render it itself.
    add_bos: bool = False
    _extra_eos_ids: frozenset[int] = frozenset()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a reply: EOS and end-of-turn tokens such as ``<|im_end|>``."""
        ids = set(self._extra_eos_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    def token_text(self, token_id: int | None) -> str:
        """The text of a special token's id ("" when the id is None or unknown)."""
        if token_id is None:
            return ""
        for text, i in self.special_tokens.items():
            if i == token_id:
                return text
        return ""

    def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_vars: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Ids of ``messages`` (and ``tools``' definitions) rendered through the model's
        chat template, BOS included when the model wants one. Control-token text inside
        messages and tools stays plain text.
        """
        ids = self.encode_trusted(self._render(messages, add_generation_prompt, template_vars, tools))
        if self._wants_bos(ids[:1]):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]  # _wants_bos checked it
        return ids

    def count_messages(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """``len(encode_chat(messages))``, with the messages' text counted by
        :meth:`count` rather than encoded (long runs in it cost nothing extra); ``tools``
        are handed to the template as ``tools``, as transformers does."""
        rendered = self._render(messages, True, None, tools)
        total = 0
        first: list[int] | None = None  # the prompt's first id, once known
        for part in self._trusted_parts(rendered):
            if isinstance(part, int):
                total += 1
                if first is None:
                    first = [part]
                continue
            if first is None and self.bos_token_id is not None and self.bos_token_id not in self._special_ids:
                # A BOS that is not a control token might come from plain text: look.
                ids = self.encode(part)
                total += len(ids)
                first = ids[:1] or None
                continue
            n = self.count(part)
            total += n
            if first is None and n:
                first = [-1]  # a plain-text id, never a control token such as BOS
        return total + self._wants_bos(first or [])

    def _wants_bos(self, first: list[int]) -> bool:
        """Whether a prompt starting with the ids ``first`` still needs its BOS."""
        return self.add_bos and self.bos_token_id is not None and first != [self.bos_token_id]

    def _render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool,
        template_vars: Mapping[str, Any] | None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> RenderedChat:
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self.name} has no chat template; count plain text with count(), "
                "or pass chat_template= when loading the tokenizer"
            )
        return render_chat(
            self.chat_template,
            check_messages(messages),
            special_tokens=self.special_tokens,
            add_generation_prompt=add_generation_prompt,
            tools=check_tools(tools) if tools is not None else None,
            template_vars={
                "bos_token": self.token_text(self.bos_token_id),
                "eos_token": self.token_text(self.eos_token_id),
                **(template_vars or {}),
            },
        )
