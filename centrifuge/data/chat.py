"""Chat records as documents: a conversation (``messages``, a list of
{role, content} turns) rendered by the tokenizer's chat template (Hugging
Face's Jinja format, rendered by transformers).

The text each turn adds to the rendering is one segment of the document. An
assistant turn's text — its content and the template's end-of-turn markup —
is labelled; everything else is context: system, user and tool turns, and the
header that opens an assistant turn (what the template writes as its
generation prompt), which the model is given at inference rather than writing
it. This needs a template that renders a conversation's prefix as a prefix of
its rendering (most do; one that rewrites earlier turns is refused).
"""

from __future__ import annotations

import hashlib
import json

from centrifuge.data.formats import Document


class ChatTemplate:
    """A tokenizer's chat template and the special-token strings it may name.
    ``identity`` changes with either (it keys the token cache)."""

    def __init__(self, template: str, variables: dict[str, str]):
        self.template, self.variables = template, dict(variables)
        text = json.dumps([template, sorted(self.variables.items())])
        self.identity = hashlib.sha256(text.encode()).hexdigest()[:24]

    @classmethod
    def of(cls, tokenizer) -> "ChatTemplate":
        if tokenizer.chat_template is None:
            raise ValueError(
                f"chat records ('messages') need a tokenizer with a chat template, and {tokenizer!r} "
                "has none: give --tokenizer (or --model) a Hugging Face directory whose "
                "tokenizer_config.json or chat_template.jinja holds one"
            )
        return cls(tokenizer.chat_template, tokenizer.template_variables)

    def render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            from jinja2 import TemplateError
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise ValueError("chat records are rendered with transformers' chat templates: "
                             "pip install transformers") from None  # fmt: skip
        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.template,
                                                add_generation_prompt=generation_prompt,
                                                **self.variables)  # fmt: skip
        except TemplateError as e:
            raise ValueError(f"{where}: the chat template fails on this conversation ({e})") from None
        return rendered[0]

    def segments(self, messages: list[dict], where: str) -> Document:
        """The conversation as (text, labelled) segments: what each turn adds to the
        rendering, an assistant turn's header (context) apart from the rest (labelled)."""
        out: Document = []
        done = ""
        for i, turn in enumerate(messages):
            assistant = turn["role"] == "assistant"
            parts = [(messages[:i], True, False)] if assistant else []
            parts.append((messages[: i + 1], False, assistant))
            for prefix, generation_prompt, labelled in parts:
                text = self.render(prefix, generation_prompt, where)
                if not text.startswith(done):
                    raise ValueError(
                        f"{where}: the chat template renders turn {i} ({turn['role']}) by changing "
                        "the text of the turns before it, so the conversation cannot be split into "
                        "context and assistant turns"
                    )
                out.append((text[len(done):], labelled))
                done = text
        return out
