"""Chat formats: how a conversation becomes token ids, which of them are supervised, how a prompt is
opened for generation and which tokens end it.

- `vicuna_v1.1`: fschat's template in MindFormers' token layout (sentencepiece only; its records
  are made by `llama_core.data.masking`); stops on eos.
- `llama3`: Meta's format, `<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>`; stops on
  `<|eot_id|>` and `<|end_of_text|>`.
- `hf`: the HF tokenizer's own Jinja `chat_template`, rendered as transformers'
  `apply_chat_template` renders it; stops on the end-of-turn token (`<|im_end|>`...), eos and
  generation_config.json's eos ids.
- `chatml`: built-in ChatML (`<|im_start|>{role}\n{content}<|im_end|>\n`) for an HF tokenizer
  without a template; stops as `hf`.

`default_chat_template` picks one when the setting is null: vicuna_v1.1 for sentencepiece, llama3
for Llama 3's tiktoken file, hf for an HF tokenizer with a chat template.

Supervised: the assistant's tokens and its end-of-turn token, nothing else (no header, no newline
after `<|im_end|>`). For a Jinja template the assistant's text is found by rendering prefixes of the
conversation: the text of messages[:k] with the generation prompt ends where assistant message k
starts, the text of messages[:k+1] ends after it; the tokens overlapping that span are supervised
up to and including the first end-of-turn token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_core.data.tokenizer import HFTokenizer, Tokenizer
from llama_core.errors import InputError

CHAT_TEMPLATES = ("vicuna_v1.1", "llama3", "hf", "chatml")
DEFAULTS = {"sentencepiece": "vicuna_v1.1", "tiktoken": "llama3"}  # hf: its own template
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# ChatML; the generation tags mark what is supervised (transformers' assistant mask reads them too)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": text}
Span = tuple[int, int]  # [start, end) token positions


def default_chat_template(tok: Tokenizer) -> str:
    """The chat format of a tokenizer when none is asked for (see the module doc)."""
    if tok.kind in DEFAULTS:
        return DEFAULTS[tok.kind]
    if tok.chat_template is None:
        raise InputError(
            f"{tok.path}: this HF tokenizer has no chat_template: set chat_template to one of "
            f"{', '.join(CHAT_TEMPLATES[1:])}"
        )
    return "hf"


class ChatFormat:
    """A conversation's prompt for generation, and the ids that end an answer."""

    name: str
    tok: Tokenizer
    stop_ids: frozenset[int]

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of `messages` followed by the opening of the assistant's turn."""
        raise NotImplementedError


class DialogFormat(ChatFormat):
    """A chat format that also makes training records."""

    def encode_dialog(self, messages: Sequence[Message]) -> tuple[list[int], list[Span]]:
        """Ids of the whole conversation and the spans to supervise (assistant turns)."""
        raise NotImplementedError


class VicunaFormat(ChatFormat):
    """fschat's vicuna_v1.1 prompt, bos first, as MindFormers trains with it (its records are made by
    `llama_core.data.masking`, token-identical to MindFormers)."""

    name = "vicuna_v1.1"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.stop_ids = frozenset({tok.eos_id})

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(self.name)
        for m in messages:
            conv.append_message(conv.roles[m["role"] == "assistant"], m["content"])
        conv.append_message(conv.roles[1], None)
        return [self.tok.bos_id, *self.tok.encode(conv.get_prompt())]


class Llama3Format(DialogFormat):
    """Meta's Llama 3 chat format (`ChatFormat.encode_message` of llama_models, content stripped)."""

    name = "llama3"

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.bos, self.eot = tok.special_id("<|begin_of_text|>"), tok.special_id("<|eot_id|>")
        self._header_ids = tok.special_id("<|start_header_id|>"), tok.special_id("<|end_header_id|>")
        self._newlines = tok.encode("\n\n")
        self._headers: dict[str, list[int]] = {}
        self.stop_ids = frozenset({self.eot, tok.special_id("<|end_of_text|>")})

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids."""
        if role not in self._headers:
            start, end = self._header_ids
            self._headers[role] = [start, *self.tok.encode(role), end, *self._newlines]
        return self._headers[role]

    def encode_dialog(self, messages: Sequence[Message]) -> tuple[list[int], list[Span]]:
        ids, spans = [self.bos], []
        for m in messages:
            ids += self.header(m["role"])
            start = len(ids)
            ids += self.tok.encode(m["content"].strip())
            ids.append(self.eot)
            if m["role"] == "assistant":
                spans.append((start, len(ids)))
        return ids, spans

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self.encode_dialog(messages)[0] + self.header("assistant")


class JinjaFormat(DialogFormat):
    """A Jinja chat template (an HF tokenizer's own, or ChatML) rendered as transformers renders it,
    then encoded whole without added specials, as `apply_chat_template(..., tokenize=True)` does."""

    def __init__(self, tok: HFTokenizer, name: str, template: str) -> None:
        self.tok, self.name = tok, name
        self._template = compile_chat_template(template)
        specials = {tok.specials[t] for t in END_OF_TURN_TOKENS if t in tok.specials}
        self.stop_ids = frozenset(specials | tok.stop_ids)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text of `messages`; InputError with the template's own message when it refuses."""
        try:
            return self._template.render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.tok.template_tokens,
            )
        except jinja2.TemplateError as exc:
            raise InputError(f"the {self.name} chat template refused the conversation: {exc}") from None

    def encode_dialog(self, messages: Sequence[Message]) -> tuple[list[int], list[Span]]:
        text = self.render(messages)
        enc = self.tok.encoding(text)
        bounds = self._assistant_text(messages, text)
        return enc.ids, [self._token_span(enc, len(text), start, end) for start, end in bounds]

    def _token_span(self, enc: Any, n_chars: int, start: int, end: int) -> Span:
        """The tokens overlapping text[start:end], up to and including the first end-of-turn token.

        Looked up by character in the encoding, without a Python loop over the tokens (this is the
        stage's hot path); when a character is in no token (offsets trimmed of spaces), by the offsets."""
        ids = enc.ids
        first = enc.char_to_token(start)
        last = enc.char_to_token(end) if end < n_chars else len(ids)
        if first is None or last is None:
            offsets = enc.offsets
            first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(ids))
            last = next((i for i, (s, _) in enumerate(offsets) if s >= end), len(ids))
        while last < len(ids) and enc.token_to_chars(last)[0] < end:  # a token across the end
            last += 1
        stops = [_index(ids, s, first, last) for s in self.stop_ids]
        return first, min((i + 1 for i in stops if i >= 0), default=last)

    def _assistant_text(self, messages: Sequence[Message], text: str) -> list[tuple[int, int]]:
        """The character span of each assistant message (its content and end of turn) in `text`."""
        bounds = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:k], add_generation_prompt=True)
            upto = text if k == len(messages) - 1 else self.render(messages[: k + 1])
            if not (text.startswith(upto) and upto.startswith(head)):
                raise InputError(
                    f"the {self.name} chat template does not render the conversation's beginnings as its "
                    f"prefixes (at message {k}): the assistant's tokens cannot be located"
                )
            bounds.append((len(head), len(upto)))
        return bounds

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self.tok.encode(self.render(messages, add_generation_prompt=True))


def chat_format(tok: Tokenizer, name: str | None = None) -> ChatFormat:
    """The chat format `name` (default: `default_chat_template`) over `tok`; InputError when the
    tokenizer cannot carry it."""
    name = default_chat_template(tok) if name is None else name
    if name not in CHAT_TEMPLATES:
        raise InputError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {name!r}")
    if name == "vicuna_v1.1":
        if tok.kind != "sentencepiece":
            raise InputError(
                f"chat_template vicuna_v1.1 is MindFormers' sentencepiece layout; {tok.path} is a {tok.kind} "
                "tokenizer"
            )
        return VicunaFormat(tok)
    if name == "llama3":
        return Llama3Format(tok)
    if not isinstance(tok, HFTokenizer):
        raise InputError(
            f"chat_template {name} needs an HF tokenizer (tokenizer.json); {tok.path} is {tok.kind}"
        )
    if name == "chatml":
        tok.special_id("<|im_start|>")
        tok.special_id("<|im_end|>")
        return JinjaFormat(tok, name, CHATML_TEMPLATE)
    if tok.chat_template is None:
        raise InputError(f"{tok.path}: chat_template hf, but this tokenizer has no chat_template")
    return JinjaFormat(tok, name, tok.chat_template)


def _index(ids: list[int], value: int, lo: int, hi: int) -> int:
    """The first index of `value` in ids[lo:hi], -1 when absent."""
    try:
        return ids.index(value, lo, hi)
    except ValueError:
        return -1


# -- Jinja as transformers sets it up for chat templates (transformers.utils.chat_template_utils)
class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' assistant-mask tags: renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` in a template, without attribute access to the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore names (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_chat_template(text: str) -> jinja2.Template:
    """A chat template compiled in transformers' sandboxed environment: trim_blocks, lstrip_blocks,
    loop controls, the generation tags, and its `tojson`, `raise_exception`, `strftime_now`, `dict`
    and `namespace`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"the chat template is not valid Jinja: {exc}") from None
