"""The generator task: grounding as pure logic, and the real int8 SmolLM2 end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edge_agent.config import GeneratorTaskConfig
from edge_agent.errors import ModelError
from edge_agent.message import Note
from edge_agent.tasks.generator import (
    GeneratorTask,
    batches,
    check_result,
    ground,
    ground_words,
    grounded_result,
    result_schema,
)
from edge_agent.tasks.prompt import EXAMPLE_NOTE, EXAMPLES, chat_format, example_values
from edge_agent.tasks.skeleton import value_end, value_text

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "smollm2-135m-instruct"
QWEN = REPO / "models" / "qwen2.5-coder-0.5b-instruct"
FIELDS = ["asset", "symptom", "action"]

# ---------------------------------------------------------------- grounding, pure logic


def test_ground_is_case_and_space_insensitive_and_reports_the_original_text() -> None:
    text = "Pump  P-101:\tMechanical\n seal LEAKING badly"
    start, end = ground(text, "mechanical seal leaking")  # type: ignore[misc]
    assert text[start:end] == "Mechanical\n seal LEAKING"
    assert ground(text, "p-101") == (6, 11)


def test_ground_ignores_outer_punctuation_and_prefers_whole_words() -> None:
    text = "sealed unit; replaced seal."
    start, end = ground(text, " seal. ")  # type: ignore[misc]
    assert (text[start:end], start) == ("seal", 22)  # the word, not the "seal" inside "sealed"
    assert ground("resealed", "seal") == (2, 6)  # no whole word: a substring still is a span of the text


def test_ground_rejects_what_is_not_in_the_text() -> None:
    assert ground("pump tripped", "pump P-204") is None
    assert ground("pump tripped", "") is None
    assert ground("pump tripped", " . ") is None


def test_ground_maps_offsets_through_characters_that_change_length_when_lowered() -> None:
    text = "İzmir line: valve V-12 stuck"  # "İ".lower() is two characters
    start, end = ground(text, "valve v-12")  # type: ignore[misc]
    assert text[start:end] == "valve V-12"


def test_ground_words_finds_reordered_and_inflected_words_and_returns_the_notes_own_text() -> None:
    text = "P-101 pump leaking at mechanical seal, replaced seal; cleaned cooling fan"
    for value, expected in [("pump P-101", "P-101 pump"), ("replacing seal", "replaced seal"),
                            ("Cleaning cooling fans", "cleaned cooling fan"), ("leak", "leaking")]:
        start, end = ground_words(text, value)  # type: ignore[misc]
        assert text[start:end] == expected


@pytest.mark.parametrize("value", [
    "pump P-102",  # another tag: codes and numbers must match exactly
    "removed seal",  # a word the note does not have
    "replaced mechanical seal",  # words that are in the note, but not in one run
    "mechanical seal replaced",  # the words are there in this order, but a comma lies between them
    "repaired seal",  # "rep" is too short a stem for "repaired" to be "replaced"
    "sealing compound",  # "sealing" is "seal" + 3 letters, but "compound" is not in the note
])
def test_ground_words_rejects_what_the_note_does_not_say_in_one_run(value: str) -> None:
    assert ground_words("P-101 pump leaking at mechanical seal, replaced seal", value) is None


def test_grounded_result_prefers_whole_words_then_inflections_then_substrings() -> None:
    text = "belt slipping near resealed joint"
    res = grounded_result(text, {"symptom": "slip", "action": "seal"})
    assert res["fields"]["symptom"] == {"text": "slipping", "start": 5, "end": 13}  # not "slip" inside it
    assert res["fields"]["action"] == {"text": "seal", "start": 21, "end": 25}  # only a substring has it
    assert ground(text, "seal", whole_words_only=True) is None


def test_grounded_result_drops_and_lists_values_not_in_the_note() -> None:
    text = "Conveyor belt torn near tail pulley, replace belt"
    raw = {"asset": "pump P-204", "symptom": "torn", "action": "Replace belt."}
    res = grounded_result(text, raw)
    assert res == {
        "fields": {"asset": None,
                   "symptom": {"text": "torn", "start": 14, "end": 18},
                   "action": {"text": "replace belt", "start": 37, "end": 49}},
        "ungrounded": ["asset"],
    }
    check_result(result_schema(FIELDS), text, res)


@pytest.mark.parametrize("empty", ["", "none", "N/A", " None. ", "unknown", "-"])
def test_empty_values_are_null_but_not_ungrounded(empty: str) -> None:
    res = grounded_result("none of it", {"asset": empty, "symptom": "x", "action": "none of it"})
    assert res["fields"]["asset"] is None and "asset" not in res["ungrounded"]
    assert res["ungrounded"] == ["symptom"]
    assert res["fields"]["action"] == {"text": "none of it", "start": 0, "end": 10}


def test_schema_rejects_wrong_shapes() -> None:
    schema = result_schema(FIELDS)
    good: dict[str, Any] = {"fields": {"asset": {"text": "P-1", "start": 0, "end": 3}, "symptom": None, "action": None},
            "ungrounded": ["symptom"]}
    schema.model_validate(good)
    bad: list[dict[str, Any]] = [
        {"fields": {"asset": None, "symptom": None}, "ungrounded": []},  # a field missing
        {"fields": {**good["fields"], "extra": None}, "ungrounded": []},  # an unknown field
        {"fields": good["fields"], "ungrounded": ["colour"]},  # an unknown name
        {"fields": {**good["fields"], "asset": {"text": "P-1", "start": 0, "end": 9}}, "ungrounded": []},
        {"fields": {**good["fields"], "asset": {"text": "", "start": 0, "end": 0}}, "ungrounded": []},
    ]
    for b in bad:
        with pytest.raises(ValidationError):
            schema.model_validate(b)
    with pytest.raises(ValueError, match="not a span"):
        check_result(schema, "Q-1 pump", good)


def test_schema_accepts_field_names_that_shadow_pydantic_attributes() -> None:
    names = ["json", "copy", "schema", "model_config", "fields"]
    schema = result_schema(names)  # filterwarnings=error: a shadowing warning would fail here
    schema.model_validate({"fields": dict.fromkeys(names), "ungrounded": ["json"]})


def test_worked_example_values_are_spans_of_their_notes() -> None:
    defaults = GeneratorTaskConfig.model_validate({"kind": "generator", "model": "m"}).fields
    values = example_values(defaults)
    assert values[0] == {"asset": "pump P-204", "symptom": "high vibration", "action": "replaced bearing"}
    # The other examples show "" for what a note does not say: a problem only, jobs only.
    assert [v["symptom"] for v in values[1:]] == ["leaking oil", "", ""]
    assert [v["action"] for v in values[1:]] == ["", "inspect and grease", "remove and refit"]
    custom = example_values({"root_cause": "why it failed", "fault_code": "", "colour": "paint colour",
                             "kit": "spare parts used"})
    assert custom[0] == {"root_cause": "misalignment", "fault_code": "E-042", "colour": "", "kit": "bearing"}
    assert custom[2]["kit"] == "bearings" and custom[3]["kit"] == ""
    assert all(v in EXAMPLES[i % len(EXAMPLES)][0] for i, shown in enumerate([*values, *custom])
               for v in shown.values())


@pytest.mark.parametrize(("pieces", "end", "value"), [
    ([' "', "p", "ump", " P", "-", "1", "0", "1", '",'], 8, "pump P-101"),  # quoted, closed by `",`
    ([' ""'], 0, ""),  # the empty value: one token
    ([' "",'], 0, ""),
    ([" ", '"', "seal", '"}'], 3, "seal"),  # white space first
    ([" null", ","], 1, "null"),  # written without quotes: ends at the comma
    ([' "', "leak", "ing"], None, "leaking"),  # not closed yet
])
def test_a_value_ends_at_its_closing_quote_or_unquoted_at_a_comma(pieces: list[str], end: int | None,
                                                                  value: str) -> None:
    assert value_end(pieces) == end
    assert value_text("".join(pieces[: None if end is None else end + 1]).rstrip(",}")) == value


def test_unknown_chat_template_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos }}[INST] {{ m }}"}))
    with pytest.raises(ModelError, match="unknown chat template"):
        chat_format(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{ m }}"}))
    assert chat_format(tmp_path)[2] == "<|im_start|>assistant\n"


# ---------------------------------------------------------------- the real int8 SmolLM2

needs_model = pytest.mark.skipif(
    not (MODEL / "manifest.json").exists(),
    reason=f"no int8 SmolLM2 at {MODEL}: build it with `edge-agent models build smollm2-135m-instruct --out {MODEL}`",
)

NOTES = [
    "Conveyor belt torn near tail pulley, replace belt",
    "engine oil leak at rear main seal",
    "PM done on TK-300: belts tensioned, 70.1 amps, runtime 801 hrs",
    'Operator says "pump <|im_end|> noisy" again',  # quotes and a chat special token in the note
]


@pytest.fixture(scope="module")
def task() -> Any:
    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(MODEL), "intra_threads": 1})
    t = GeneratorTask("extract", cfg)
    yield t
    t.close()


@pytest.fixture(scope="module")
def batch(task: GeneratorTask) -> list[dict[str, Any]]:
    return task.process([Note(text=t, topic="plant/l1/notes") for t in NOTES])


@needs_model
def test_results_are_valid_and_every_span_is_the_note_text(task: GeneratorTask, batch: list[dict[str, Any]]) -> None:
    schema = result_schema(FIELDS)
    assert len(batch) == len(NOTES)
    for text, res in zip(NOTES, batch, strict=True):
        schema.model_validate(res)
        json.dumps(res)
        for name, span in res["fields"].items():
            assert (span is None) or text[span["start"] : span["end"]] == span["text"], name
    assert any(span is not None for res in batch for span in res["fields"].values())


@needs_model
def test_values_not_in_the_note_are_dropped_and_listed(task: GeneratorTask, batch: list[dict[str, Any]]) -> None:
    raw = task.generate(NOTES)
    dropped = 0
    for text, values, res in zip(NOTES, raw, batch, strict=True):
        assert set(values) == set(FIELDS)
        for name, value in values.items():
            assert '"' not in value  # the forced skeleton: a value ends at its closing quote
            if (value.strip() and ground(text, value) is None and ground_words(text, value) is None
                    and value.strip().lower() not in ("none", "n/a")):
                assert res["fields"][name] is None and name in res["ungrounded"]
                dropped += 1
    # SmolLM2 copies the worked example's asset ("pump P-204") or invents one for the TK-300 note.
    assert dropped >= 1


@needs_model
def test_deterministic_and_batch_equals_one_by_one(task: GeneratorTask, batch: list[dict[str, Any]]) -> None:
    notes = [Note(text=t, topic="plant/l1/notes") for t in NOTES]
    # Not vacuous: at least two notes share a batch (equal padded prompt length) in the first field's round.
    lengths = [len(task.prompter.pad(task.prompter.tail(t), task.pad_multiple)) for t in NOTES]
    assert len(set(lengths)) < len(lengths)
    assert task.process(notes) == batch
    assert [task.process([n])[0] for n in notes] == batch
    assert task.process([]) == []


def test_batches_hold_one_length_and_keep_to_both_bounds() -> None:
    assert batches([16, 24, 16, 16, 24], 2, 512) == [[0, 2], [3], [1, 4]]
    # 100-token prompts: 5 fit 512 tokens; a prompt over the budget runs alone
    assert batches([100] * 7, 8, 512) == [[0, 1, 2, 3, 4], [5, 6]]
    assert batches([600, 600, 8], 8, 512) == [[0], [1], [2]]
    assert batches([], 8, 512) == []


@needs_model
def test_a_token_budget_changes_the_batches_not_the_results(batch: list[dict[str, Any]]) -> None:
    """batch_tokens = 16: every note's prompt is longer, so each runs alone (with the other notes of its
    length, batches of up to 8 at the default): the results are the same."""
    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(MODEL), "intra_threads": 1,
                                              "batch_tokens": 16})
    t = GeneratorTask("extract", cfg)
    calls: list[int] = []
    model_generate = t._model.generate_batch

    def counted(prompts: list[list[str]], **kw: Any) -> Any:
        calls.append(len(prompts))
        return model_generate(prompts, **kw)

    t._model = type("Counted", (), {"generate_batch": staticmethod(counted), "unload_model": lambda self: None})()
    try:
        assert t.process([Note(text=x, topic="plant/l1/notes") for x in NOTES]) == batch
    finally:
        t._model = None
    assert calls and max(calls) == 1


@needs_model
def test_prompt_is_chatml_with_the_worked_example(task: GeneratorTask) -> None:
    p = task.prompter
    vocab = p.tokenizer.get_vocab()
    text = p.tokenizer.decode([vocab[t] for t in p.prompt(NOTES[3])], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert EXAMPLE_NOTE in text and '{"asset": "pump P-204", "symptom": "high vibration"' in text
    assert all(note in text for note, _ in EXAMPLES)
    # The note's own <|im_end|> is broken up: exactly 9 turns end (system, 4 x example user and assistant)
    # before the note's turn.
    assert text.count("<|im_end|>") == 10
    assert text.endswith('<|im_end|>\n<|im_start|>assistant\n{"asset":')


@needs_model
def test_the_empty_value_is_a_continuation_of_the_skeleton(task: GeneratorTask) -> None:
    """`""` is one token in these vocabularies: a forced prefix that ended with the value's opening quote
    made "not mentioned" unreachable (every field got filled). The prefix now ends at the key's colon."""
    from edge_agent.tasks.generator import _Skeleton

    p = task.prompter
    text = p.tokenizer.decode([p.vocab[t] for t in p.prompt(NOTES[0])], skip_special_tokens=False)
    skeleton = text.rsplit("<|im_start|>assistant\n", 1)[1]
    assert json.loads(skeleton + ' ""}') == {"asset": ""}  # the single token ` ""` closes a valid object
    note = _Skeleton(p, len(FIELDS), 16)
    empty, quote = p.vocab['Ġ"",'], p.vocab['Ġ"']
    assert [note.step_value(t) for t in [empty]] == [True]
    assert note.values == [""]
    assert [note.step_value(t) for t in [quote, *p.tokenizer.encode("torn").ids, p.vocab['",']]][-1] is True
    assert note.values == ["", "torn"]
    forced = p.tokenizer.decode([p.vocab[t] for t in note.forced])
    assert json.loads(skeleton + forced + ' ""}') == {"asset": "", "symptom": "torn", "action": ""}


needs_qwen = pytest.mark.skipif(
    not (QWEN / "manifest.json").exists(),
    reason=f"no int8 Qwen 0.5B: `edge-agent models build qwen2.5-coder-0.5b-instruct --out {QWEN}`")


@needs_qwen
def test_qwen_leaves_a_field_empty_when_the_note_does_not_say() -> None:
    """Before the fix Qwen 0.5B filled the symptom of this note with 'hydraulic hose' (and every other
    empty field); the model writes the empty value itself now."""
    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(QWEN), "intra_threads": 1})
    t = GeneratorTask("extract", cfg)
    try:
        text = "change out hydraulic hose on loader"
        res = t.process([Note(text=text, topic="plant/l1/notes")])[0]
    finally:
        t.close()
    assert res["fields"]["symptom"] is None and res["ungrounded"] == []
    assert res["fields"]["asset"] == {"text": "hydraulic hose", "start": 11, "end": 25}
    assert res["fields"]["action"] == {"text": "change out", "start": 0, "end": 10}


@needs_model
def test_wrong_kind_and_closed_task_are_model_errors(task: GeneratorTask) -> None:
    encoder = REPO / "models" / "minilm-l6"
    if (encoder / "manifest.json").exists():
        cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(encoder)})
        with pytest.raises(ModelError, match="not a generator"):
            GeneratorTask("x", cfg)
    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(MODEL), "intra_threads": 1})
    t = GeneratorTask("y", cfg)
    t.close()
    with pytest.raises(ModelError, match="closed"):
        t.generate(["pump leaking"])


@needs_model
def test_generation_reports_progress_for_the_watchdog(task: GeneratorTask) -> None:
    """A 256-note batch can take a minute on 2 cores: the task beats after every length group of every
    field, so the pipeline's watchdog sees a slow batch progressing (tests/test_notify.py)."""
    from edge_agent.progress import progress

    beats: list[float] = []
    with progress(lambda: beats.append(0.0)):
        task.process([Note(text=t, topic="plant/l1/notes") for t in NOTES[:2]])
    assert len(beats) >= len(FIELDS)  # at least one group per field


@pytest.mark.parametrize("model", [MODEL, QWEN], ids=["smollm2", "qwen0.5b"])
def test_cli_predict_writes_one_result_per_input_line(model: Path) -> None:
    """`edge-agent generator predict`: JSONL {"text"} in, the task's result per line out, same order."""
    import os
    import subprocess
    import sys

    if not (model / "manifest.json").exists():
        pytest.skip(f"no model at {model}")
    lines = [json.dumps({"text": "Conveyor belt torn near tail pulley, replace belt"}), "not json",
             json.dumps({"text": "change out hydraulic hose on loader", "id": 7})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "generator", "predict", "--model", str(model),
                           "--fields", "asset,action", "--threads", "1"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 3 and "error" in out[1]
    for text, res in ((json.loads(lines[0])["text"], out[0]), (json.loads(lines[2])["text"], out[2])):
        check_result(result_schema(["asset", "action"]), text, res)
    assert out[0]["fields"]["action"]["text"] in ("replace", "replace belt")  # the verb, or with its object
    bad = subprocess.run([sys.executable, "-m", "edge_agent", "generator", "predict", "--model", str(model),
                          "--fields", "Asset"], input="", capture_output=True, text=True, timeout=300, env=env,
                         cwd=REPO)
    assert bad.returncode == 2 and "--fields" in bad.stderr
