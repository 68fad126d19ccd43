"""Field extraction (asset, symptom, action) on MaintIE gold: the generator task with each decoder and the
token tagger, side by side, in one run.

    python bench/accuracy_extract.py [--part test|dev] [--n 60] [--models a,b,...] [--json OUT]

Data: ../shared/data/maintie_gold.jsonl, split as bench/accuracy_maintie.py (rows sorted by id, first 80 %
train, next 10 % dev, last 10 % test: the tagger bench's own held-out part). `--n` notes from the start of
the part (default 60 of test's 108). Prompts and the skeleton are chosen on dev; test is for reporting.

Per field, over the grounded result (`fields[name]`, a span of the note or null):
- `hit`: share of the notes that have a gold span of the matching type (asset ~ PhysicalObject, symptom ~
  State, action ~ Activity) whose value overlaps one such span (character ranges intersect);
- `empty_where_none`: share of the notes without such a gold span whose value is null;
- `copies`: raw values (before grounding) equal to a worked example's value ("pump P-204", ...) that the
  note itself does not contain (a note that says "leaking" may well be answered "leaking").
Targets (issue 11): asset hit >= 0.95, action and symptom hit >= 0.85, empty where none >= 0.8, copies 0.

Rows: `generator:<model>` for each built model among smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct,
qwen2.5-coder-1.5b-instruct (models/NAME, or --models), with the daemon's GeneratorTask and default fields;
`tagger:minilm-l6`: the numpy tagger head on the int8 MiniLM, trained on train (epoch chosen on dev) as in
accuracy_maintie.py, each field taking the note's first predicted entity of the matching type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_maintie import split  # noqa: E402

from edge_agent.config import _DEFAULT_FIELDS, GeneratorTaskConfig  # noqa: E402
from edge_agent.tasks.prompt import example_values  # noqa: E402

GOLD_TYPE = {"asset": "PhysicalObject", "symptom": "State", "action": "Activity"}
GENERATORS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
TARGETS = {"hit": {"asset": 0.95, "symptom": 0.85, "action": 0.85}, "empty_where_none": 0.8, "copies": 0}


def notes(part: str, n: int) -> list[dict[str, Any]]:
    """The part's first n rows as {id, text, gold: {field: [(start, end)]}} (character offsets)."""
    from edge_agent.train.tagger import from_maintie

    out = []
    for row in split()[part][:n]:
        ex = from_maintie(row)
        gold = {f: [(e["start"], e["end"]) for e in ex["entities"] if e["type"] == t] for f, t in GOLD_TYPE.items()}
        out.append({"id": row["id"], "text": ex["text"], "gold": gold})
    return out


def _overlaps(gold: list[tuple[int, int]], span: dict[str, Any] | None) -> bool:
    return span is not None and any(span["start"] < end and span["end"] > start for start, end in gold)


def score(rows: list[dict[str, Any]], results: list[dict[str, Any]],
          raw: list[dict[str, str]] | None) -> dict[str, Any]:
    examples = example_values(_DEFAULT_FIELDS)
    per: dict[str, Any] = {}
    for f in GOLD_TYPE:
        have = [(r, res) for r, res in zip(rows, results, strict=True) if r["gold"][f]]
        none = [(r, res) for r, res in zip(rows, results, strict=True) if not r["gold"][f]]

        hits = sum(_overlaps(r["gold"][f], res["fields"][f]) for r, res in have)
        empty = sum(res["fields"][f] is None for _, res in none)
        shown = {ex[f].lower() for ex in examples if ex[f]}
        copies = None if raw is None else sum(
            v[f].strip().lower() in shown and v[f].strip().lower() not in r["text"].lower()
            for r, v in zip(rows, raw, strict=True))
        per[f] = {"hit": round(hits / len(have), 3) if have else None, "hit_n": f"{hits}/{len(have)}",
                  "empty_where_none": round(empty / len(none), 3) if none else None,
                  "empty_where_none_n": f"{empty}/{len(none)}", "copies": copies,
                  "ungrounded": sum(f in res.get("ungrounded", []) for res in results)}
    return per


def generator_row(model: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from edge_agent.tasks.generator import GeneratorTask, grounded_result

    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(model), "intra_threads": 1,
                                              "inter_threads": 2})
    task = GeneratorTask("bench", cfg)
    t0 = time.monotonic()
    try:
        raw = task.generate([r["text"] for r in rows])
    finally:
        task.close()
    results = [grounded_result(r["text"], v) for r, v in zip(rows, raw, strict=True)]
    return {"name": f"generator:{model.name}", "fields": score(rows, results, raw),
            "seconds": round(time.monotonic() - t0, 1),  # a shared machine: not a speed figure
            "values": [{"id": r["id"], "text": r["text"], "raw": v, "gold": {
                f: [r["text"][s:e] for s, e in spans] for f, spans in r["gold"].items()}}
                for r, v in zip(rows, raw, strict=True)]}


def tagger_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    from edge_agent.models.encoder import Encoder
    from edge_agent.train import tagger as tagger_train

    model = REPO / "models" / "minilm-l6"
    if not (model / "manifest.json").is_file():
        return None
    parts = split()
    conv = {k: [tagger_train.from_maintie(r) for r in parts[k]] for k in ("train", "dev")}
    encoder = Encoder(model, intra_threads=2, max_length=128)
    head = tagger_train.train(encoder, conv["train"], dev=conv["dev"])
    texts = [r["text"] for r in rows]
    predicted = head.predict(texts, encoder.token_states(texts))
    results = []
    for text, ents in zip(texts, predicted, strict=True):
        fields: dict[str, Any] = {}
        for f, t in GOLD_TYPE.items():
            e = min((e for e in ents if e["type"] == t), key=lambda e: e["start"], default=None)
            fields[f] = None if e is None else {"text": text[e["start"] : e["end"]], "start": e["start"],
                                                "end": e["end"]}
        results.append({"fields": fields, "ungrounded": []})
    return {"name": "tagger:minilm-l6 (trained on train, epoch on dev; first entity of the type)",
            "fields": score(rows, results, None)}


def table(report: dict[str, Any]) -> str:
    lines = [f"MaintIE {report['part']} part, {report['notes']} notes ({report['ids']})",
             f"{'row':<44} {'field':<8} {'hit':>11} {'empty/none':>12} {'copies':>6}"]
    for row in report["rows"]:
        for f, m in row["fields"].items():
            lines.append(f"{row['name'][:44]:<44} {f:<8} {m['hit']!s:>5} {m['hit_n']:>5} "
                         f"{m['empty_where_none']!s:>5} {m['empty_where_none_n']:>6} {m['copies']!s:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("test", "dev"), default="test")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--models", help="comma-separated model directories (default: the built defaults)")
    ap.add_argument("--no-tagger", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = notes(args.part, args.n)
    models = ([Path(m) for m in args.models.split(",")] if args.models else
              [REPO / "models" / g for g in GENERATORS if (REPO / "models" / g / "manifest.json").is_file()])
    report: dict[str, Any] = {"part": args.part, "notes": len(rows), "ids": f"{rows[0]['id']}..{rows[-1]['id']}",
                              "split": "sorted by id; first 80% train, next 10% dev, last 10% test "
                                       "(bench/accuracy_maintie.py)", "targets": TARGETS, "rows": []}
    for model in models:
        report["rows"].append(generator_row(model, rows))
        print(f"{model.name}: done", file=sys.stderr, flush=True)
    if not args.no_tagger and (row := tagger_row(rows)) is not None:
        report["rows"].append(row)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
