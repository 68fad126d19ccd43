"""Generator task: configured fields extracted by a small int8 decoder (SmolLM2 by default), grounded.

JSON by construction. CTranslate2 has no grammar hook, so the model never writes the JSON syntax: the
assistant turn is a fixed key skeleton, and the model only fills the values. Each field's value is the greedy
continuation of `prompt + {"f1": "v1", ..., "fk":` up to the value's closing quote (`skeleton.value_end`), an
end-of-turn token, or `max_field_tokens`; the generated tokens are kept as they are and the next key is
appended as tokens, so the model sees exactly what it wrote. The key stops at its colon, so that the model
itself chooses between an opening quote and the empty value: `""` (and `"",`) is a single token in SmolLM2's
and Qwen's vocabularies, and a prefix that ended with the opening quote made "not mentioned" unreachable
(measured: every field filled). The prompt is in edge_agent.prompt.

Run in two stages (GeneratorTask.generate), which is the same procedure computed once per token, the way
llama.cpp does it with its prefix cache: CTranslate2 cannot keep a note's state between calls, so forcing
each key in a call of its own would forward the note again for every field.
- free run: one call per batch continues each note past its first value; a callback follows the skeleton
  token by token and stops a note as soon as its tokens leave it (the model wrote something other than the
  next key) or its last value is done. SmolLM2 writes the keys itself for ~85 % of notes.
- forced: a note stopped early resumes at its next field, from its prompt + everything kept so far + that
  field's key, one generate_batch round per field, as before.
Only prompts of equal length share a batch (see GeneratorTask), so a note's result does not depend on what
else is in its batch.

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
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import ctranslate2
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..config import GeneratorTaskConfig
from ..errors import ModelError
from ..message import Note
from ..models.manifest import verify
from ..progress import heartbeat
from .base import intra_threads
from .prompt import Prompter
from .skeleton import value_text

NULL_VALUES = frozenset(
    {"", "none", "n/a", "na", "null", "nil", "-", "--", "unknown", "not mentioned", "not specified"})
_STRIP = " \t\r\n.,;:"

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


def batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """The indices of the prompts of each model call: prompts of one length only, at most `batch_size` of
    them and at most `batch_tokens` tokens in all (one prompt alone when it is longer), in first-seen order
    of length and each prompt's order within it."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out = []
    for n, group in by_length.items():
        size = max(1, min(batch_size, batch_tokens // max(n, 1)))
        out += [group[k : k + size] for k in range(0, len(group), size)]
    return out


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


# ---------------------------------------------------------------- the task

class GeneratorTask:
    def __init__(self, name: str, cfg: GeneratorTaskConfig, *, batch_size: int | None = None, pad_multiple: int = 8,
                 static_prompt: bool = True) -> None:
        """Batching, and why notes are padded: CTranslate2 forwards the prompts of a batch at once only up to
        the shortest one and decodes the rest one step per token. That costs a full decoding step per extra
        token, and it makes a note's result depend on its neighbours: int8 numerics differ by path, and
        SmolLM2's greedy choices are often near ties (measured: 15 of 32 notes changed with batches of mixed
        lengths). So only prompts of exactly equal length share a batch, and to make such batches large each
        prompt is left-padded (white space before the note) to a multiple of `pad_multiple` tokens. The
        padding depends on the note alone: a note's result is the same alone or in any batch.
        `batch_size`: notes per batch at most (default: the task's config). `static_prompt=False` turns the
        prompt cache off (benchmarks).
        Threads: batches of one round are submitted together, so `inter_threads` = cores with `intra_threads`
        = 1 runs them in parallel (on 2 cores a little faster than intra_threads 2; +80 MB RSS)."""
        self.name = name
        self.cfg = cfg
        self.fields = dict(cfg.fields)
        self.batch_size = batch_size or cfg.batch_size
        self.pad_multiple = pad_multiple
        self.use_static_prompt = static_prompt
        model_dir = Path(cfg.model)
        self.manifest = verify(model_dir)
        if self.manifest["kind"] != "generator":
            raise ModelError(f"{model_dir} holds an {self.manifest['kind']}, not a generator; build one with "
                             "`edge-agent models build smollm2-135m-instruct`")
        self.prompter = Prompter(model_dir, self.fields)
        threads = intra_threads(cfg.intra_threads)
        try:
            self._model: ctranslate2.Generator | None = ctranslate2.Generator(
                str(model_dir), device="cpu", compute_type="int8", intra_threads=threads,
                inter_threads=cfg.inter_threads)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"CTranslate2 could not load {model_dir}: {e}") from e
        self.schema = result_schema(list(self.fields))

    def _options(self, **kw: Any) -> dict[str, Any]:
        options: dict[str, Any] = dict(return_end_token=True, include_prompt_in_result=False, beam_size=1,
                                       sampling_topk=1, **kw)
        if self.use_static_prompt:
            options["static_prompt"] = self.prompter.static
        return options

    def _run(self, prompts: Sequence[list[str]], options: dict[str, Any],
             callback: Callable[[int, int], bool] | None = None) -> list[list[int]]:
        """Generate for every prompt (what follows the static prompt), in batches of equal length (`batches`):
        the ids generated after each prompt, up to and with the stop token. `callback(prompt index, token id)`
        is called for each generated token and stops that prompt's generation when it returns True."""
        if self._model is None:
            raise ModelError(f"task {self.name!r} is closed")
        groups = batches([len(p) for p in prompts], self.batch_size, self.cfg.batch_tokens)
        if not self.use_static_prompt:
            prompts = [self.prompter.static + p for p in prompts]
        # Submitted together so that inter_threads > 1 runs groups in parallel (CTranslate2 drops the GIL).
        pending = []
        for g in groups:
            if callback is not None:
                options["callback"] = lambda step, g=g: callback(g[step.batch_id], step.token_id)
            pending.append(self._model.generate_batch([prompts[i] for i in g], asynchronous=True, **options))
        out: list[list[int]] = [[] for _ in prompts]
        for g, futures in zip(groups, pending, strict=True):
            for i, future in zip(g, futures, strict=True):
                out[i] = future.result().sequences_ids[0]
            heartbeat()  # one length group done: slow, not stuck (the watchdog listens)
        return out

    def generate(self, texts: Sequence[str]) -> list[dict[str, str]]:
        """The model's raw value for each field of each text (not grounded): a free run for all texts, then
        the fields of the notes that left the skeleton, one forced round per field (see the module doc)."""
        p = self.prompter
        prompts = [p.pad(p.tail(t), self.pad_multiple) for t in texts]
        notes = [_Skeleton(p, len(self.fields), self.cfg.max_field_tokens) for _ in texts]
        free_length = len(self.fields) * self.cfg.max_field_tokens + sum(len(p.encode(k)) for k in p.keys)
        self._run(prompts, self._options(max_length=free_length, end_token=sorted(p.eos_ids)),
                  lambda i, token: notes[i].step(token))
        forced = self._options(max_length=self.cfg.max_field_tokens, end_token=sorted(p.eos_ids))
        for k in range(len(self.fields)):
            todo = [i for i, n in enumerate(notes) if len(n.values) == k]
            for i in todo:
                notes[i].resume()
            self._run([prompts[i] + notes[i].forced for i in todo], forced,
                      lambda j, token, todo=todo: notes[todo[j]].step_value(token))
            for i in todo:
                notes[i].finish()  # a value cut off at max_field_tokens
            heartbeat()  # a field's round done, even an empty one (the watchdog listens)
        return [dict(zip(self.fields, n.values, strict=True)) for n in notes]

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


class _Skeleton:
    """One note's way through the key skeleton: its values so far, and the tokens (as strings) that follow
    its prompt to ask for the next field: the kept tokens of each value and the keys after them. A value is
    what the model writes after a key's colon up to its closing quote (`Prompter.value_end`): the model
    chooses between an opening quote and the empty value itself."""

    def __init__(self, prompter: Prompter, fields: int, max_tokens: int) -> None:
        self.p = prompter
        self.fields = fields
        self.max_tokens = max_tokens
        self.values: list[str] = []
        self.forced: list[str] = []
        self.ids: list[int] = []  # the value being generated
        self.expect: list[int] = []  # the rest of the key that the free run must write next

    def value(self, ids: list[int]) -> list[int]:
        """A value is done (its generated ids with the token that ended it, if any): record it, append what
        is kept of it and the next key to `forced`; return the next key's ids."""
        keep, rest = self.p.cut(ids)
        self.values.append(value_text(self.p.tokenizer.decode(ids[:keep]) + rest))
        if len(self.values) == self.fields:
            return []
        key = self.p.encode(rest + self.p.keys[len(self.values)])
        self.forced += [self.p.token(t) for t in ids[:keep]] + key
        return [self.p.vocab[t] for t in key]

    def _done(self, token: int) -> list[int] | None:
        """Add one token of a value; the value's ids once it is done, else None."""
        self.ids.append(token)
        if self.p.value_end(self.ids) is None and len(self.ids) < self.max_tokens:
            return None
        ids, self.ids = self.ids, []
        return ids

    def step(self, token: int) -> bool:
        """One token of the free run; True to stop it: the last value is done, or the token is not the one
        the skeleton wants (the note then resumes with the forced procedure at its next field)."""
        if self.expect:
            if token != self.expect[0]:
                return True
            del self.expect[0]
            return False
        ids = self._done(token)
        if ids is None:
            return False
        self.expect = self.value(ids)
        stop = ids[self.p.cut(ids)[0] :]  # the token that ended the value: the next key's first token?
        if stop:
            if not self.expect or stop[0] != self.expect[0] or stop[0] in self.p.eos_ids:
                return True
            del self.expect[0]
        return len(self.values) == self.fields

    def resume(self) -> None:
        """Before a forced round: the free run's partial value and expected key are dropped."""
        self.ids, self.expect = [], []

    def step_value(self, token: int) -> bool:
        """One token of a forced round; True once the value is done."""
        ids = self._done(token)
        if ids is None:
            return False
        self.value(ids)
        return True

    def finish(self) -> None:
        """After a forced round: a value still open (cut off at max_field_tokens) is done as it is."""
        if self.ids:
            ids, self.ids = self.ids, []
            self.value(ids)
