"""Learning from corrections on FMC: test accuracy after 0, 10, 25, 50, 100 (and all) corrections.

    python -m bench.learning_curve [--model models/minilm-l6] [--seeds 5] [--json OUT]

What a `learn = true` classifier task does on the gateway (edge_agent.learn), replayed on FMC
(../shared/data/fmc_mwo2kg.jsonl, 22 labels): it starts zero-shot from the label names, and each retrain fits
a head on the label names as seed rows plus the corrections so far (here: train rows in a random order, one
order per seed), the same numpy head as `edge-agent classifier train`. The peer in the same run is retraining
from scratch with the same correction rows only (what an engineer would do offline with `feedback export` and
`classifier train`, which needs two labels to start). Test rows (62) are scored at every point; nothing is
chosen on them. Each retrain is a full fit, so the gateway's head after N corrections is exactly a head
trained on those rows plus the seeds: the difference between the two columns is the seed rows' worth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from edge_agent.models.encoder import Encoder
from edge_agent.tasks.fit import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDGE_AGENT_DATA") or REPO.parent / "shared" / "data")
POINTS = (0, 10, 25, 50, 100, 200, 564)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "minilm-l6")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (DATA / "fmc_mwo2kg.jsonl").read_text(encoding="utf-8").splitlines() if line]
    pool = [r for r in rows if r["split"] in ("train", "dev")]
    test = [r for r in rows if r["split"] == "test"]
    labels = sorted({r["label"] for r in rows})
    enc = Encoder(args.model, intra_threads=2)
    texts = [r["text"] for r in pool] + [r["text"] for r in test] + labels
    emb = dict(zip(texts, enc.embed(texts), strict=True))
    test_texts, truth = [r["text"] for r in test], np.array([r["label"] for r in test])
    test_emb = np.stack([emb[t] for t in test_texts])

    def accuracy(fit_texts: list[str], fit_labels: list[str]) -> float | None:
        if len(set(fit_labels)) < 2:
            return None
        head = train(fit_texts, fit_labels, np.stack([emb[t] for t in fit_texts]), encoder_sha="bench", folds=0)
        pred = np.array(head.labels)[head.probabilities(test_emb, test_texts).argmax(axis=1)]
        return float((pred == truth).mean())

    label_vecs = enc.embed(labels)
    zero_shot = np.array(labels)[(test_emb @ label_vecs.T).argmax(axis=1)]
    table = []
    for n in POINTS:
        gateway, scratch = [], []
        for seed in range(args.seeds):
            order = np.random.default_rng(seed).permutation(len(pool))[:n]
            t, y = [pool[i]["text"] for i in order], [pool[i]["label"] for i in order]
            gateway.append(accuracy(labels + t, labels + y))  # seeds: each label name is a row of its own
            s = accuracy(t, y)
            if s is not None:
                scratch.append(s)
        row = {"corrections": n, "gateway": round(float(np.mean(gateway)), 4),
               "from_scratch": round(float(np.mean(scratch)), 4) if scratch else None}
        if n == 0:
            row["zero_shot_live"] = round(float((zero_shot == truth).mean()), 4)
        table.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model.name), "seeds": args.seeds, "test_rows": len(test),
                                         "curve": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
