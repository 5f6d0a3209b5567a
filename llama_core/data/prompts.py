"""The turns of a conversation record after MindFormers' role checks (docs/REFERENCE.md, token
layout): as the fschat vicuna_v1.1 prompt, or as chat messages for the other chat formats
(`llama_core.data.chat`); and how records are named in errors and reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_core.errors import InputError

TEMPLATE = "vicuna_v1.1"
ROLE_NAMES = {"human": 0, "gpt": 1}
MESSAGE_ROLES = ("user", "assistant")  # the chat-message role of each of ROLE_NAMES' values


def record_label(path: str, index: int, record: Any) -> str:
    """How a record is named in errors and warnings: file, index and, when it has one, its id."""
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"{path}: record {index}"
    return f"{where} (id {rid})" if isinstance(rid, (str, int)) else where


def record_id(path: str, index: int, record: Any) -> str:
    """How a record is named in the report: its id, else `file#index`."""
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if isinstance(rid, (str, int)) else f"{path}#{index}"


def checked_turns(path: str, index: int, record: Any) -> list[tuple[int, str]]:
    """The (role, text) turns of a conversation record, role 0 human and 1 gpt, after the reference's
    checks: a gpt turn first in the conversation is dropped and the remaining roles must alternate
    from human. Bad records fail naming the file, record and field."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    label = record_label(path, index, record)
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{label}: field 'conversations' must be a non-empty list of turns")
    roles = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_NAMES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise InputError(
                f"{label}: field 'conversations[{t}].from' must be 'human' or 'gpt', got {got!r}"
            )
        if not isinstance(turn.get("value"), str):
            got = type(turn.get("value")).__name__ if "value" in turn else "nothing"
            raise InputError(f"{label}: field 'conversations[{t}].value' must be a string, got {got}")
        roles.append(ROLE_NAMES[turn["from"]])
    start = 1 if roles[0] != 0 else 0
    for j, t in enumerate(range(start, len(turns))):
        if roles[t] != j % 2:
            raise InputError(
                f"{label}: roles do not alternate: conversations[{t}] is "
                f"'{turns[t]['from']}' where '{('human', 'gpt')[j % 2]}' was expected"
            )
    return [(roles[t], turns[t]["value"]) for t in range(start, len(turns))]


def vicuna_prompt(conv: Any, path: str, index: int, record: Any) -> str:
    """The prompt of one record built with fschat template `conv` (its messages are replaced)."""
    conv.messages = []
    for role, text in checked_turns(path, index, record):
        conv.append_message(conv.roles[role], text)
    return conv.get_prompt()


def conversation_messages(path: str, index: int, record: Any) -> list[dict[str, str]]:
    """The record's turns as chat messages: human -> user, gpt -> assistant (`checked_turns`)."""
    return [
        {"role": MESSAGE_ROLES[role], "content": text} for role, text in checked_turns(path, index, record)
    ]


def split_prompts(items: Sequence[str | Mapping[str, Any]]) -> tuple[list[str], list[str | None]]:
    """The instructions and the answer each must contain (None: unchecked), from plain strings and
    `{"prompt": ..., "expect": ...}` objects; InputError naming the index of a malformed one."""
    prompts, expected = [], []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            expect = item.get("expect")
            if (
                set(item) - {"prompt", "expect"}
                or not isinstance(item.get("prompt"), str)
                or not (expect is None or (isinstance(expect, str) and expect))
            ):
                raise InputError(f"prompt {i}: must be a string or {{prompt: str, expect: non-empty str}}")
            item = item["prompt"]
        else:
            expect = None
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"prompt {i}: must be a non-empty string, got {item!r}")
        prompts.append(item)
        expected.append(expect)
    return prompts, expected


def holds_answer(output: str, expect: str) -> bool:
    """Whether a completion contains the expected answer (case and surrounding spaces ignored)."""
    return expect.strip().casefold() in output.casefold()
