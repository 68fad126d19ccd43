"""The generator task's prompt: chat format, system turn, worked example, and its tokens (Prompter).

Prompt (ChatML or another known chat format, read from tokenizer_config.json's chat_template): a system turn
(instruction + the fields and their descriptions), four worked examples (each a user turn with a maintenance
note, an assistant turn with its JSON), then the note. Everything up to the note is the same for every message:
it is passed as `static_prompt`, which CTranslate2 forwards once and caches, so the examples cost no prefill per
note (Qwen 0.5B: 1.97 vs 1.45 notes/s without the cache; for SmolLM2 the cache stops paying past ~200 tokens,
and these 269 make it slower than without: bench/run.py generate, `generate_prompt_cache`). The examples' values
are spans of fixed, realistic notes (`EXAMPLES`); a configured field gets, in each example, the value of the
category whose keywords appear in its name (then its description), or "" when none fits or the note does not
mention it (which shows the model that "" is how to say "not mentioned": with one full example, Qwen 0.5B filled
symptom on 44 % of MaintIE dev notes that have none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tokenizers

from ..errors import ModelError
from .skeleton import cut, key, value_end

SYSTEM = (
    'Extract fields from the maintenance note. Copy each value exactly from the note. If the note does not say, '
    'write "".\nFields:\n'
)
# What a configured field is about, by keywords of its name or description (see example_values).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("asset", ("asset", "equipment", "machine", "component", "device", "object", "unit", "tag")),
    ("symptom", ("symptom", "problem", "fault", "failure", "issue", "state", "condition", "defect", "wrong")),
    ("action", ("action", "activity", "work", "repair", "fix", "task", "done", "doing", "remedy")),
    ("cause", ("cause", "reason", "root", "why")),
    ("code", ("alarm", "code", "error", "trip")),
    ("part", ("part", "spare", "spares")),
    ("location", ("location", "area", "line", "site", "where", "position")),
    ("measurement", ("measurement", "value", "reading", "vibration", "measured")),
    ("duration", ("duration", "downtime", "hours", "time", "long")),
)
# The worked examples, in prompt order: a note and its value per category (a category it does not mention
# is ""). Each value is a span of its note. They show the shapes of a maintenance note: a problem and what
# was done, a problem only, jobs only (chosen on MaintIE's dev part with Qwen2.5-Coder-0.5B, over one full
# example and over three other orders and mixes: bench/accuracy_extract.py).
EXAMPLES: tuple[tuple[str, dict[str, str]], ...] = (
    ("Line 2 pump P-204 tripped on E-042, high vibration 7.1 mm/s from misalignment; replaced bearing, 2.5 h",
     {"asset": "pump P-204", "symptom": "high vibration", "action": "replaced bearing", "cause": "misalignment",
      "code": "E-042", "part": "bearing", "location": "Line 2", "measurement": "7.1 mm/s", "duration": "2.5 h"}),
    ("gearbox on mixer 2 leaking oil", {"asset": "gearbox", "symptom": "leaking oil", "location": "mixer 2"}),
    ("inspect and grease fan bearings on AHU-3",
     {"asset": "fan bearings", "action": "inspect and grease", "part": "bearings", "location": "AHU-3"}),
    ("remove and refit guard on conveyor 4",
     {"asset": "guard", "action": "remove and refit", "location": "conveyor 4"}),
)
EXAMPLE_NOTE = EXAMPLES[0][0]
MAX_NOTE_TOKENS = 512  # a longer note is cut for the model (grounding still searches all of it)

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


# ---------------------------------------------------------------- prompt

def category(name: str, description: str) -> str | None:
    """The CATEGORIES entry a field is about: the first holding a word of its name, last word first
    ("fault_code" is a code), else a word of its description; None if none fits."""
    words = [*reversed(name.split("_")), *re.findall(r"[a-z]+", description.lower())]
    return next((c for w in words for c, keys in CATEGORIES if w in keys), None)


def example_values(fields: dict[str, str]) -> list[dict[str, str]]:
    """Each worked example's value for each field ("" for a field of no category, which also shows the
    model that "" is how to say "not mentioned")."""
    kinds = {name: category(name, description) for name, description in fields.items()}
    return [{name: values.get(kind or "", "") for name, kind in kinds.items()} for _, values in EXAMPLES]


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
        notes = [note for note, _ in EXAMPLES]
        if system_turn is None:  # the system text opens the first user turn
            static, notes[0] = "", system + "\n" + notes[0]
        else:
            static = system_turn.format(system)
        static += "".join(user_turn.format(note) + assistant_start + json.dumps(values) + assistant_end
                          for note, values in zip(notes, example_values(self.fields), strict=True))
        head, _, turn_end = user_turn.partition("{}")
        self.turn_end = turn_end + assistant_start
        # The static part is encoded with the tokenizer's specials (a BOS where the model wants one).
        self.static = self.tokenizer.encode(static + head, add_special_tokens=True).tokens
        self.specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.keys = [key(k, i == 0) for i, k in enumerate(self.fields)]
        self.filler = (self.encode(" ") or self.encode("\n"))[0]
        self.vocab = vocab = self.tokenizer.get_vocab()
        pieces = self.tokenizer.decode_batch([[i] for i in range(self.tokenizer.get_vocab_size())],
                                             skip_special_tokens=False)
        self.pieces = pieces
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

    def value_end(self, ids: list[int]) -> int | None:
        """The index of the generated token that ends a value (see `skeleton.value_end`), or None."""
        return value_end([self.pieces[t] for t in ids], [t in self.eos_ids for t in ids])

    def cut(self, ids: list[int]) -> tuple[int, str]:
        """Where a generated value ends: (tokens kept, text of the ending token that belongs to the value)."""
        return cut([self.pieces[t] for t in ids], [t in self.eos_ids for t in ids])
