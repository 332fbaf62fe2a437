"""Turn records into token ids and labels, masking everything but what the model should learn.

Formats (``data.format``, or detected from the first record's fields):
* text: {"text"} — every token is trained.
* alpaca: {"instruction", "input"?, "output"} — the response is trained.
* prompt_completion: {"prompt", "completion"} — the completion is trained.
* messages: {"messages": [{"role", "content"}, ...]} — assistant turns are trained.
* sharegpt: {"conversations": [{"from", "value"}, ...]} — ShareGPT's layout (the most common chat
  layout on the Hub): roles mapped (human/user → user, gpt/assistant/… → assistant, system), then
  as messages.
Instruction formats go through the tokenizer's chat template when it has one (alpaca and
prompt/completion become a user + assistant exchange); otherwise a plain Alpaca-style prompt.
``train_on_prompt`` trains every token. Masked labels are -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swengine.errors import UserError

IGNORE = -100
FORMATS = ("text", "alpaca", "prompt_completion", "messages", "sharegpt")
REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "messages": ("messages",), "sharegpt": ("conversations",)}
# ShareGPT speaker names → chat roles (the names seen in public ShareGPT-layout datasets)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def detect_format(record: dict, requested: str = "auto", text_field: str = "text") -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise UserError(f"data.format={requested!r} is not valid; choose one of: auto, {', '.join(FORMATS)}")
        return requested
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    raise UserError(f"cannot tell the dataset format from fields {sorted(record)}; expected one of: "
                    f"'{text_field}' (text), 'instruction'+'output' (alpaca), 'prompt'+'completion', 'messages', "
                    "'conversations' (sharegpt)")


def _kind(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}")


def _field_error(record: dict, fmt: str, text_field: str) -> str | None:
    """Why a record's fields have the wrong types (None if they are fine): every trained or prompted
    field must be a string, never null, a number or a list (which would train on "None" / "['x']")."""
    strings = {"text": (text_field,), "alpaca": ("instruction", "output"),
               "prompt_completion": ("prompt", "completion")}.get(fmt, ())
    for name in strings:
        if not isinstance(record[name], str):
            return f"field {name!r} is {_kind(record[name])}; it must be a string"
    if fmt == "alpaca" and record.get("input") is not None and not isinstance(record["input"], str):
        return f"field 'input' is {_kind(record['input'])}; it must be a string (or absent)"
    if fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return f"field 'messages' is {_kind(messages) if messages != [] else 'empty'}; it must be a non-empty list"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"messages[{j}] must be an object with 'role' and 'content'"
            for name in ("role", "content"):
                if not isinstance(m[name], str):
                    return f"messages[{j}].{name} is {_kind(m[name])}; it must be a string"
    if fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            return (f"field 'conversations' is {_kind(turns) if turns != [] else 'empty'}; it must be a non-empty "
                    "list")
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                return f"conversations[{j}] must be an object with 'from' and 'value'"
            if not isinstance(t["value"], str):
                return f"conversations[{j}].value is {_kind(t['value'])}; it must be a string"
            if t["from"] not in SHAREGPT_ROLES:
                return (f"conversations[{j}].from is {t['from']!r}; expected one of: "
                        f"{', '.join(SHAREGPT_ROLES)}")
    return None


def sharegpt_messages(turns: list[dict]) -> list[dict]:
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def record_error(record: dict, fmt: str, source: str, i: int, text_field: str = "text",
                 at: str | None = None) -> str | None:
    """Why record ``i`` does not fit its format (one line naming where), or None."""
    needed = (text_field,) if fmt == "text" else REQUIRED[fmt]
    missing = [f for f in needed if f not in record]
    if missing:
        line = f" at {at}" if at else ""
        return (f"{source}: record {i} has no {', '.join(repr(m) for m in missing)} field{line} "
                f"(format {fmt} needs {', '.join(needed)}; it has {', '.join(sorted(record)) or 'none'})")
    problem = _field_error(record, fmt, text_field)
    return f"{at or f'{source}: record {i}'}: {problem} (format {fmt})" if problem else None


def check_fields(records: list[dict], fmt: str, source: str, text_field: str = "text",
                 where: list[str] | None = None, max_bad: int = 0) -> list[int]:
    """Every record has its format's fields, as strings. ``where`` names each record (file:line).
    Up to ``max_bad`` malformed records are tolerated: their indices are returned (to be left out,
    and counted); one more is an error naming the first."""
    bad: list[tuple[int, str]] = []
    for i, r in enumerate(records):
        problem = record_error(r, fmt, source, i, text_field, where[i] if where else None)
        if problem:
            bad.append((i, problem))
            if len(bad) > max_bad:
                more = f" ({len(bad)} malformed so far, data.max_bad_rows={max_bad})" if max_bad else ""
                raise UserError(bad[0][1] + more)
    return [i for i, _ in bad]


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_example(tokenizer, messages: list[dict], train_on_prompt: bool) -> Example:
    """Token ids of the rendered conversation; labels on assistant turns only. Spans come from
    rendering growing prefixes, so any chat template works (no generation tags needed)."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError("each message must be an object with 'role' and 'content'")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    if train_on_prompt:
        return Example(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                               return_dict=False) if i else []
        # up to the last message is the whole conversation: already rendered
        upto = ids if i == len(messages) - 1 else tokenizer.apply_chat_template(messages[: i + 1], tokenize=True,
                                                                                 return_dict=False)
        before = list(before["input_ids"] if isinstance(before, dict) else before)
        upto = list(upto["input_ids"] if isinstance(upto, dict) else upto)
        if ids[:len(before)] != before or ids[:len(upto)] != upto:
            raise UserError(f"the chat template renders the conversation up to turn {i} differently from the "
                            "whole conversation, so the assistant tokens cannot be located; use a template whose "
                            "prefixes are prefixes (data.chat_template=chatml|llama3|<file.jinja>) or "
                            "data.train_on_prompt=true")
        start, end = len(before), len(upto)
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


BUNDLED_TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"


def with_chat_template(tokenizer, template: str):
    """``data.chat_template``: a bundled template's name (chatml, llama3) or a jinja file, on a
    copy of the tokenizer (its own template, if any, is left alone)."""
    import copy

    bundled = BUNDLED_TEMPLATES / f"{template}.jinja"
    path = bundled if bundled.is_file() else Path(template).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUNDLED_TEMPLATES.glob("*.jinja")))
        raise UserError(f"data.chat_template={template!r} is neither a bundled template ({names}) nor a jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.chat_template: cannot read {path} ({exc})") from None
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = text
    return tokenizer


def _plain_example(tokenizer, prompt: str, answer: str, train_on_prompt: bool) -> Example:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + p + a + eos
    labels = list(ids) if train_on_prompt else [IGNORE] * (len(bos) + len(p)) + a + eos
    return Example(ids, labels)


def text_examples(texts: list[str], tokenizer) -> list[Example]:
    """Text-format examples, tokenised in one call (every token trained)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ids in _encode(texts, tokenizer):
        ids = bos + list(ids) + eos
        out.append(Example(ids, list(ids)))
    return out


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids without special tokens: straight from a fast tokenizer's backend (several times
    faster than the transformers call for short texts) when it agrees with that call on the first
    text, else one text at a time through the tokenizer's call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and texts:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        if ids[0] == list(tokenizer(texts[0], add_special_tokens=False)["input_ids"]):
            return ids
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def to_example(record: dict, fmt: str, tokenizer, *, train_on_prompt: bool = False, text_field: str = "text") -> Example:
    if fmt == "text":
        return text_examples([record[text_field]], tokenizer)[0]
    if fmt in ("messages", "sharegpt"):
        if not _has_template(tokenizer):
            raise UserError(f"{fmt}-format data needs a tokenizer with a chat template")
        messages = record["messages"] if fmt == "messages" else sharegpt_messages(record["conversations"])
        return _chat_example(tokenizer, messages, train_on_prompt)
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        answer = record["output"]
    else:
        user, answer = record["prompt"], record["completion"]
    if _has_template(tokenizer):
        return _chat_example(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                             train_on_prompt)
    if fmt == "alpaca":
        input_block = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
        prompt = ALPACA_PROMPT.format(instruction=record["instruction"], input_block=input_block)
    else:
        prompt = user
    return _plain_example(tokenizer, prompt, answer, train_on_prompt)
