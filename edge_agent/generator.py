"""Generator task: configured fields extracted by a small int8 decoder (SmolLM2 by default), grounded.

JSON by construction. CTranslate2 has no grammar hook, so the model never writes the JSON syntax: the
assistant turn is a fixed key skeleton that we force, and the model only fills the values. For each field in
order, every note of the batch is continued from `prompt + {"f1": "v1", ..., "fk": "` until a token that
contains a double quote (cut there), an end-of-turn token, or `max_field_tokens`. The generated tokens are
kept as they are and the next key is appended as tokens, so the model sees exactly what it wrote.

Prompt (ChatML or another known chat format, read from tokenizer_config.json's chat_template): a system turn
(instruction + the fields and their descriptions), ONE worked example (a user turn with a maintenance note,
an assistant turn with its JSON), then the note. Everything up to the note is the same for every message:
it is passed as `static_prompt`, which CTranslate2 forwards once and caches (2-3x more notes/s). The
example's values are spans of one fixed, realistic note (`EXAMPLE_NOTE`); a configured field gets the
example value whose keywords appear in its name (then its description), or "" when none fits (which also
shows the model that "" is how to say "not mentioned").

Batching: each field is one generate_batch round for all notes. Only prompts of equal length share a batch
(see GeneratorTask), so a note's result does not depend on what else is in its batch.

Grounding: the model's values are often wrong (SmolLM2 copies the example, paraphrases, invents). A value
is published only as a span of the note: searched case-insensitively with white space normalised, first at
word boundaries; failing that, as a run of the note's words holding each of the value's words in any order
and up to an inflection (SmolLM2 writes "replacing seal" for "replaced seal", "pump P-101" for "P-101
pump"). It is reported as the original text `note[start:end]` with its offsets. A value that is not
in the note is dropped (null) and its field listed in `ungrounded`; "", "none", "n/a" and the like are
null without being ungrounded.

Result per note: `{"fields": {name: {"text", "start", "end"} | null}, "ungrounded": [name, ...]}`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import ctranslate2
import tokenizers
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from . import models
from .config import GeneratorTaskConfig
from .errors import ModelError
from .processors import Note, heartbeat

SYSTEM = (
    'Extract fields from the maintenance note. Copy each value exactly from the note. If the note does not say, '
    'write "".\nFields:\n'
)
EXAMPLE_NOTE = "Line 2 pump P-204 tripped on E-042, high vibration 7.1 mm/s from misalignment; replaced bearing, 2.5 h"
# (keywords, value) rows for the worked example's values (see example_values). Each value is a span of
# EXAMPLE_NOTE.
EXAMPLE_VALUES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("asset", "equipment", "machine", "component", "device", "object", "unit", "tag"), "pump P-204"),
    (("symptom", "problem", "fault", "failure", "issue", "state", "condition", "defect", "wrong"), "high vibration"),
    (("action", "activity", "work", "repair", "fix", "task", "done", "doing", "remedy"), "replaced bearing"),
    (("cause", "reason", "root", "why"), "misalignment"),
    (("alarm", "code", "error", "trip"), "E-042"),
    (("part", "spare", "spares"), "bearing"),
    (("location", "area", "line", "site", "where", "position"), "Line 2"),
    (("measurement", "value", "reading", "vibration", "measured"), "7.1 mm/s"),
    (("duration", "downtime", "hours", "time", "long"), "2.5 h"),
)
MAX_NOTE_TOKENS = 512  # a longer note is cut for the model (grounding still searches all of it)
NULL_VALUES = frozenset(
    {"", "none", "n/a", "na", "null", "nil", "-", "--", "unknown", "not mentioned", "not specified"})
_STRIP = " \t\r\n.,;:"

# Chat formats by a marker of their chat_template: (system turn, user turn, assistant start, assistant end).
# A format without a system role gets the system text at the top of the first user turn.
CHAT_FORMATS: dict[str, tuple[str | None, str, str, str]] = {
    "<|im_start|>": ("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
                     "<|im_start|>assistant\n", "<|im_end|>\n"),  # ChatML: SmolLM2, Qwen2
    "<|start_header_id|>": ("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                            "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),  # Llama 3
    "<|assistant|>": ("<|system|>\n{}<|end|>\n", "<|user|>\n{}<|end|>\n", "<|assistant|>\n", "<|end|>\n"),  # Phi-3
    "<start_of_turn>": (None, "<start_of_turn>user\n{}<end_of_turn>\n", "<start_of_turn>model\n",
                        "<end_of_turn>\n"),  # Gemma
}


# ---------------------------------------------------------------- grounding (pure logic)

def _normalise(text: str) -> tuple[str, list[int]]:
    """Lower-cased text with runs of white space as one space, and each character's index in `text`."""
    out: list[str] = []
    where: list[int] = []
    space = False
    for i, ch in enumerate(text):
        if ch.isspace():
            if not space and out:
                out.append(" ")
                where.append(i)
            space = True
            continue
        space = False
        for low in ch.lower():
            out.append(low)
            where.append(i)
    if out and out[-1] == " ":
        out.pop()
        where.pop()
    return "".join(out), where


def ground(text: str, value: str, *, whole_words_only: bool = False) -> tuple[int, int] | None:
    """The (start, end) of `value` in `text`, or None: case-insensitive, white space normalised, outer
    white space and trailing punctuation of the value ignored; a match at word boundaries is preferred,
    and required with `whole_words_only`."""
    needle, _ = _normalise(value.strip(_STRIP))
    if not needle:
        return None
    hay, where = _normalise(text)
    found = [m.start() for m in re.finditer(f"(?={re.escape(needle)})", hay)]
    if not found:
        return None

    def whole_words(pos: int) -> bool:
        end = pos + len(needle)
        return (pos == 0 or not (hay[pos - 1].isalnum() and needle[0].isalnum())) and (
            end == len(hay) or not (hay[end].isalnum() and needle[-1].isalnum()))

    start = next((pos for pos in found if whole_words(pos)), None if whole_words_only else found[0])
    if start is None:
        return None
    return where[start], where[start + len(needle) - 1] + 1


_WORD = re.compile(r"\w(?:[\w./-]*\w)?")
_MIN_STEM = 4  # letters two forms of a word must share ("replac-ed", "replac-ing")
_MAX_ENDING = 4  # letters after the shared stem, on each side ("slip-ping")


def _same_word(a: str, b: str) -> bool:
    """Two forms of one word: equal; one the other plus at most two letters (fan/fans); or sharing a stem of
    at least _MIN_STEM letters followed by at most _MAX_ENDING letters on each side (replaced/replacing,
    slip/slipping, vibration/vibrating). Only words of letters: tags, codes and numbers must be equal."""
    if a == b:
        return True
    stem = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if not (a.isalpha() and b.isalpha()):
        return False  # tags, codes and numbers match exactly or not at all
    plural = stem == min(len(a), len(b)) and abs(len(a) - len(b)) <= 2  # fan/fans, box/boxes
    return plural or (stem >= _MIN_STEM and len(a) - stem <= _MAX_ENDING and len(b) - stem <= _MAX_ENDING)


def ground_words(text: str, value: str) -> tuple[int, int] | None:
    """The (start, end) of a run of the note's words, separated by white space only (a run does not cross
    a comma or a full stop), that holds each of the value's words once up to an inflection ("replacing
    seal" -> "replaced seal"): in the value's order if there is such a run, else in any order ("pump P-101"
    -> "P-101 pump"). None if there is none. What is published is that run of the note, never the value."""
    wanted = [w.lower() for w in _WORD.findall(value)]
    words = list(_WORD.finditer(text))
    n = len(wanted)
    if not n:
        return None
    runs = [words[i : i + n] for i in range(len(words) - n + 1)]
    runs = [r for r in runs if all(not text[a.end() : b.start()].strip() for a, b in itertools.pairwise(r))]
    for run in runs:  # in order
        if all(_same_word(want, have.group().lower()) for want, have in zip(wanted, run, strict=True)):
            return run[0].start(), run[-1].end()
    for run in runs:  # any order
        left: list[str | None] = [w.group().lower() for w in run]
        for want in wanted:
            hit = next((i for i, have in enumerate(left) if have is not None and _same_word(want, have)), None)
            if hit is None:
                break
            left[hit] = None
        else:
            return run[0].start(), run[-1].end()
    return None


def is_null(value: str) -> bool:
    return value.strip(_STRIP).lower() in NULL_VALUES


def grounded_result(text: str, values: dict[str, str]) -> dict[str, Any]:
    """The task's result for one note from the model's raw values: spans of `text` or null, and the names
    of the fields whose value was not found in the text."""
    fields: dict[str, dict[str, Any] | None] = {}
    ungrounded: list[str] = []
    for name, value in values.items():
        # Whole words first, then the same words inflected ("slip" -> "slipping"), then any substring.
        span = None if is_null(value) else (ground(text, value, whole_words_only=True)
                                             or ground_words(text, value) or ground(text, value))
        if span is None and not is_null(value):
            ungrounded.append(name)
        fields[name] = None if span is None else {"text": text[span[0] : span[1]], "start": span[0], "end": span[1]}
    return {"fields": fields, "ungrounded": ungrounded}


class Span(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(min_length=1)
    start: int = Field(ge=0)
    end: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end - self.start != len(self.text):
            raise ValueError("end - start must equal len(text)")
        return self


def result_schema(names: Sequence[str]) -> type[BaseModel]:
    """A pydantic model of one note's result for these field names. Fields are stored under positional
    attribute names with the configured name as alias, so that no name can shadow a BaseModel attribute."""
    frozen = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)
    spans: dict[str, Any] = {f"f{i}": (Span | None, Field(alias=name)) for i, name in enumerate(names)}
    fields_model: type[BaseModel] = create_model("ExtractedFields", __config__=frozen, **spans)
    name_type: Any = Literal[tuple(names)]
    return create_model("Extraction", __config__=frozen, fields=(fields_model, ...), ungrounded=(list[name_type], ...))


def check_result(schema: type[BaseModel], text: str, result: dict[str, Any]) -> None:
    """Validate the shape and that every span is exactly the text it claims (ValueError otherwise)."""
    schema.model_validate(result)
    for name, span in result["fields"].items():
        if span is not None and text[span["start"] : span["end"]] != span["text"]:
            raise ValueError(f"field {name!r}: {span!r} is not a span of the note")


# ---------------------------------------------------------------- prompt

def example_values(fields: dict[str, str]) -> dict[str, str]:
    """The worked example's value for each field: the first EXAMPLE_VALUES row holding a word of the field's
    name, last word first ("fault_code" is a code), else a word of its description; else ""."""
    out = {}
    for name, description in fields.items():
        words = [*reversed(name.split("_")), *re.findall(r"[a-z]+", description.lower())]
        out[name] = next((v for w in words for keys, v in EXAMPLE_VALUES if w in keys), "")
    return out


def chat_format(model_dir: Path) -> tuple[str | None, str, str, str]:
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: cannot read tokenizer_config.json for the chat template: {e}") from e
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    for marker, fmt in CHAT_FORMATS.items():
        if marker in template:
            return fmt
    raise ModelError(f"{model_dir}: unknown chat template (supported: ChatML, Llama 3, Phi-3, Gemma); "
                     "the generator task needs an instruction-tuned model with one of these")


def _key(name: str, first: bool) -> str:
    return ('{"' if first else '", "') + name + '": "'


# ---------------------------------------------------------------- prompt tokens

class Prompter:
    """The tokens of the prompt and of the forced skeleton for one model and one set of fields. Needs only
    the tokenizer files, so that benchmarks can hand a peer exactly the same prompts."""

    def __init__(self, model_dir: Path, fields: dict[str, str]) -> None:
        system_turn, user_turn, assistant_start, assistant_end = chat_format(model_dir)
        self.fields = dict(fields)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        system = SYSTEM + "".join(f"- {k}: {v}\n" for k, v in self.fields.items())
        example = json.dumps(example_values(self.fields))
        if system_turn is None:
            static = user_turn.format(system + "\n" + EXAMPLE_NOTE)
        else:
            static = system_turn.format(system) + user_turn.format(EXAMPLE_NOTE)
        static += assistant_start + example + assistant_end
        head, _, turn_end = user_turn.partition("{}")
        self.turn_end = turn_end + assistant_start
        # The static part is encoded with the tokenizer's specials (a BOS where the model wants one).
        self.static = self.tokenizer.encode(static + head, add_special_tokens=True).tokens
        self.specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.keys = [_key(k, i == 0) for i, k in enumerate(self.fields)]
        self.filler = (self.encode(" ") or self.encode("\n"))[0]
        vocab = self.tokenizer.get_vocab()
        pieces = self.tokenizer.decode_batch([[i] for i in range(self.tokenizer.get_vocab_size())],
                                             skip_special_tokens=False)
        self.quote_ids = frozenset(i for i, piece in enumerate(pieces) if '"' in piece)
        ends = (assistant_end.strip(), "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
        self.eos_ids = frozenset(vocab[t] for t in ends if t in vocab)

    def encode(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def tail(self, text: str) -> list[str]:
        """The note's own part of the prompt, up to the first value. A special token written in the note
        (`<|im_end|>`...) is broken up so that a note cannot end its turn or forge another one."""
        for special in self.specials:
            if special in text:
                text = text.replace(special, special[0] + " " + special[1:])
        return self.encode(text)[:MAX_NOTE_TOKENS] + self.encode(self.turn_end + self.keys[0])

    def prompt(self, text: str, pad_multiple: int = 1) -> list[str]:
        """The whole prompt of the first field, static part included (tests; peers that must see the same)."""
        return self.static + self.pad(self.tail(text), pad_multiple)

    def pad(self, tail: list[str], multiple: int) -> list[str]:
        """The tail left-padded with white space tokens (after the user turn's header, before the note) to a
        multiple of `multiple` tokens."""
        return [self.filler] * (-len(tail) % multiple) + tail

    def cut(self, ids: list[int]) -> tuple[int, str]:
        """Where a generated value ends: (tokens kept, text of the stop token before its quote)."""
        if ids and ids[-1] in self.quote_ids:
            return len(ids) - 1, self.tokenizer.decode(ids[-1:], skip_special_tokens=False).split('"', 1)[0]
        if ids and ids[-1] in self.eos_ids:
            return len(ids) - 1, ""
        return len(ids), ""


# ---------------------------------------------------------------- the task

class GeneratorTask:
    def __init__(self, name: str, cfg: GeneratorTaskConfig, *, batch_size: int = 32, pad_multiple: int = 8,
                 static_prompt: bool = True) -> None:
        """Batching, and why notes are padded: CTranslate2 forwards the prompts of a batch at once only up to
        the shortest one and decodes the rest one step per token. That costs a full decoding step per extra
        token, and it makes a note's result depend on its neighbours: int8 numerics differ by path, and
        SmolLM2's greedy choices are often near ties (measured: 15 of 32 notes changed with batches of mixed
        lengths). So only prompts of exactly equal length share a batch, and to make such batches large each
        prompt is left-padded (white space before the note) to a multiple of `pad_multiple` tokens. The
        padding depends on the note alone: a note's result is the same alone or in any batch.
        `batch_size`: notes per batch at most. `static_prompt=False` turns the prompt cache off (benchmarks).
        Threads: batches of one round are submitted together, so `inter_threads` = cores with `intra_threads`
        = 1 runs them in parallel (on 2 cores a little faster than intra_threads 2; +80 MB RSS)."""
        self.name = name
        self.cfg = cfg
        self.fields = dict(cfg.fields)
        self.batch_size = batch_size
        self.pad_multiple = pad_multiple
        self.use_static_prompt = static_prompt
        model_dir = Path(cfg.model)
        self.manifest = models.verify(model_dir)
        if self.manifest["kind"] != "generator":
            raise ModelError(f"{model_dir} holds an {self.manifest['kind']}, not a generator; build one with "
                             "`edge-agent models build smollm2-135m-instruct`")
        self.prompter = Prompter(model_dir, self.fields)
        threads = cfg.intra_threads or min(4, os.cpu_count() or 1)
        try:
            self._model: ctranslate2.Generator | None = ctranslate2.Generator(
                str(model_dir), device="cpu", compute_type="int8", intra_threads=threads,
                inter_threads=cfg.inter_threads)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"CTranslate2 could not load {model_dir}: {e}") from e
        self._end_tokens = sorted(self.prompter.quote_ids | self.prompter.eos_ids)
        self.schema = result_schema(list(self.fields))

    def _continue(self, tails: Sequence[list[str]]) -> list[list[int]]:
        """One field for every note: the ids generated after each tail, up to and with the stop token."""
        if self._model is None:
            raise ModelError(f"task {self.name!r} is closed")
        options: dict[str, Any] = dict(
            max_length=self.cfg.max_field_tokens, end_token=self._end_tokens, return_end_token=True,
            include_prompt_in_result=False, beam_size=1, sampling_topk=1)
        static = self.prompter.static
        if self.use_static_prompt:
            options["static_prompt"] = static
        prompts = [self.prompter.pad(t, self.pad_multiple) for t in tails]
        if not self.use_static_prompt:
            prompts = [static + p for p in prompts]
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        groups = [g[k : k + self.batch_size] for g in by_length.values() for k in range(0, len(g), self.batch_size)]
        # Submitted together so that inter_threads > 1 runs groups in parallel (CTranslate2 drops the GIL).
        pending = [self._model.generate_batch([prompts[i] for i in g], asynchronous=True, **options)
                   for g in groups]
        out: list[list[int]] = [[] for _ in tails]
        for g, futures in zip(groups, pending, strict=True):
            for i, future in zip(g, futures, strict=True):
                out[i] = future.result().sequences_ids[0]
            heartbeat()  # one length group done: slow, not stuck (the watchdog listens)
        return out

    def generate(self, texts: Sequence[str]) -> list[dict[str, str]]:
        """The model's raw value for each field of each text (not grounded). Fields are stepped for all
        texts together: each step continues every note's prompt + the skeleton filled so far."""
        p = self.prompter
        tails = [p.tail(t) for t in texts]
        values: list[dict[str, str]] = [{} for _ in texts]
        names = list(self.fields)
        for k, name in enumerate(names):
            if not tails:
                break
            for i, ids in enumerate(self._continue(tails)):
                keep, rest = p.cut(ids)
                values[i][name] = p.tokenizer.decode(ids[:keep]) + rest
                if k + 1 < len(names):
                    # The generated tokens stay as they are; the next key is appended as tokens.
                    tails[i] += [p.token(t) for t in ids[:keep]] + p.encode(rest + p.keys[k + 1])
        return values

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        texts = [n.text for n in notes]
        out = []
        for text, values in zip(texts, self.generate(texts), strict=True):
            result = grounded_result(text, values)
            check_result(self.schema, text, result)
            out.append(result)
        return out

    def close(self) -> None:
        if self._model is not None:
            self._model.unload_model()
            self._model = None
