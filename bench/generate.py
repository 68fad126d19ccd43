"""Extraction with the int8 generator: notes/s of edge_agent.tasks.generator (CTranslate2 int8 SmolLM2-135M-Instruct,
batched, static prompt cache) against llama-cpp-python on the Q4_1 GGUF that the int8 model was built from.

Both sides get the same prompts and the same procedure, greedy, each in its own process, same thread count:
- prompt: the task's own (system + one worked example + the note), tokens computed once by
  edge_agent.tasks.prompt.Prompter and handed to both sides as ids (with the task's left padding to a multiple
  of 8 tokens, kept for all fields);
- forced skeleton: for each field, continue `prompt + {"f1": "v1", ..., "fk":` up to the value's closing
  quote, an end-of-turn token or max_field_tokens (16) (edge_agent.tasks.skeleton, shared by both sides);
  keep the generated tokens, append the next key's tokens, go on. Values are compared between the sides
  (`agreement`: all fields equal).
- ours: GeneratorTask.generate over all notes at once (notes of equal prompt length decoded together, at
  most the task's batch_size (8) per model call, static prompt = system + worked examples, cached by
  CTranslate2), with the task's default threads: inter_threads 1, intra_threads min(4, cores) (rows
  `/inter_threads=N` and _1_thread show the alternatives; generate_batching one note per call). It computes
  the same procedure in two stages: a free run that follows the skeleton token by token and stops a note where the
  model writes anything else than the next key, then the forced rounds for the fields left (see
  edge_agent.tasks.generator). Every token is forwarded once, as by the peer; the peer forces the keys (a prefill of
  a few tokens, cheaper for it than decoding them) because it keeps a note's state between calls, which CTranslate2
  cannot.
- peer: llama_cpp.Llama (n_threads as ours, n_ctx 1024), one note at a time, Llama.generate(top_k=1, temp=0),
  which reuses the longest common prefix of its KV cache with the previous call: the static prompt and, within
  a note, everything forced so far (llama.cpp's equivalent of the prompt cache, arguably stronger than ours).
Timed: the extraction loop only (models loaded and warmed on one note first); CPU time of the process too.
The machine is shared: the full run alternates the sides over 2 rounds and keeps each side's best round.
Notes: bench/common.make_notes (realistic maintenance notes with tags, codes and measurements).

Models: SmolLM2-135M-Instruct (Q4_1 GGUF; rows `generate_*`) and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF,
assembled from six wheels; rows `generate_*/qwen2.5-coder-0.5b-instruct`), each against the GGUF it was
converted from (bench/gguf.py reassembles those into .bench/gguf/ from the cached wheels). BENCH_GENERATOR_MODEL
replaces the SmolLM2 folder (e.g. a fine-tuned build; its peer still reads the SmolLM2 GGUF).

llama-cpp-python is a bench-only optional peer, never a project dependency. It is looked for in the
interpreter named by BENCH_LLAMA_PYTHON (default .bench/venv-llama/bin/python), which `bash bench/setup`
builds from source with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
(~13 min on 2 cores; a native build crashes on VMs that report AMX). bench/run.py names it and stops when
it is missing.

    python bench/run.py generate [--quick] --json OUT
    python -m bench.generate accuracy [--n 40]   # grounding sanity check on MaintIE gold spans

Child roles (internal): `ours` and `peer`, reading a JSON job on stdin, writing one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = Path(os.environ.get("BENCH_GENERATOR_MODEL", REPO / "models" / "smollm2-135m-instruct"))
LLAMA_PYTHON = os.environ.get("BENCH_LLAMA_PYTHON") or str(REPO / ".bench" / "venv-llama" / "bin" / "python")
# (models/ folder name, default model whose GGUF the peer reads, row-name suffix)
GENERATORS = ((MODEL, "smollm2-135m-instruct", ""),
              (REPO / "models" / "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct",
               "/qwen2.5-coder-0.5b-instruct"))
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")  # built by bench/run.py when missing
MAINTIE = REPO.parent / "shared" / "data" / "maintie_gold.jsonl"
MAX_FIELD_TOKENS = 16
PAD_MULTIPLE = 8  # GeneratorTask's default


def _threads() -> int:
    return min(4, os.cpu_count() or 1)  # the task's default for intra_threads = 0


def peers() -> list:
    from bench.common import Peer
    from bench.gguf import gguf_path

    return [Peer("llama-cpp-python (the peer of generate)", python=LLAMA_PYTHON, module="llama_cpp"),
            *(Peer(f"the {name} GGUF for llama-cpp-python", path=gguf_path(name, build=False))
              for _, name, _ in GENERATORS)]


# ---------------------------------------------------------------- children

def child_ours(job: dict[str, Any]) -> dict[str, Any]:
    from edge_agent.config import GeneratorTaskConfig
    from edge_agent.tasks.generator import GeneratorTask

    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": job["model"],
                                              "max_field_tokens": MAX_FIELD_TOKENS, "intra_threads": job["threads"],
                                              "inter_threads": job.get("inter_threads", 1)})
    task = GeneratorTask("bench", cfg, batch_size=job["batch_size"], static_prompt=job["static_prompt"])
    texts = job["texts"]
    task.generate(texts[:1])  # warm: the static prompt's cache, allocator, kernels
    c0, t0 = time.process_time(), time.perf_counter()
    values = []
    for start in range(0, len(texts), job["call_size"]):  # call_size: notes per process() call (daemon batch)
        values += task.generate(texts[start : start + job["call_size"]])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    task.close()
    import resource

    return {"wall_s": wall, "cpu_s": cpu, "values": values,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def child_peer(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp  # type: ignore[import-not-found]

    llm = llama_cpp.Llama(job["gguf"], n_ctx=1024, n_batch=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False)
    sys.path.insert(0, str(REPO))
    from edge_agent.tasks.skeleton import cut, value_end, value_text  # standard library only

    pieces = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in range(llm.n_vocab())]
    eos = set(job["eos_ids"])
    keys = job["keys"]

    def one(prompt: list[int]) -> dict[str, str]:
        tokens = list(prompt)
        out: dict[str, str] = {}
        for k, name in enumerate(job["fields"]):
            gen: list[int] = []
            for tok in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                    reset=True):
                gen.append(tok)
                ended = value_end([pieces[t] for t in gen], [t in eos for t in gen]) is not None
                if ended or len(gen) >= job["max_field_tokens"]:
                    break
            keep, rest = cut([pieces[t] for t in gen], [t in eos for t in gen])
            out[name] = value_text(llm.detokenize(gen[:keep]).decode("utf-8", "replace") + rest)
            if k + 1 < len(keys):
                tokens = tokens + gen[:keep] + llm.tokenize((rest + keys[k + 1]).encode(), add_bos=False,
                                                            special=False)
        return out

    prompts = job["prompts"]
    one(prompts[0])  # warm
    c0, t0 = time.process_time(), time.perf_counter()
    values = [one(p) for p in prompts]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "values": values, "llama_cpp": llama_cpp.__version__}


def _spawn(python: str, role: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([python, "-m", "bench.generate", role], input=json.dumps(job), text=True,
                          capture_output=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent

def _peer_available() -> str | None:
    """None if llama-cpp-python imports in LLAMA_PYTHON, else why not."""
    return next((why for why in (p.missing() for p in peers()[:1]) if why), None)


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for model, name, suffix in GENERATORS:
        first = not suffix
        # The bigger model: fewer notes, and only the head-to-head row (the others are about our engine).
        # Qwen: 24 notes (--quick) is three of the daemon's default batches, the least that shows how it
        # runs under a backlog (6 notes made 3 batches of 2); `generate_batching` gives one note per call.
        rows += _run(quick, model, name, suffix, n=(12 if quick else 48) if first else (24 if quick else 48),
                     extra_rows=first)
    return rows


def _run(quick: bool, model: Path, name: str, suffix: str, n: int, extra_rows: bool) -> list[dict[str, Any]]:
    from bench.common import make_notes
    from bench.gguf import gguf_name, gguf_path
    from edge_agent.config import _DEFAULT_FIELDS, GeneratorTaskConfig
    from edge_agent.tasks.prompt import Prompter

    if not (model / "model.bin").exists():
        raise SystemExit(f"no generator model at {model}: edge-agent models build {name} --out {model}")
    threads = _threads()
    texts = [json.loads(payload)["text"] for _, payload in make_notes(n, seed=7)]
    prompter = Prompter(model, _DEFAULT_FIELDS)
    vocab = prompter.tokenizer.get_vocab()
    prompts = [[vocab[t] for t in prompter.prompt(x, PAD_MULTIPLE)] for x in texts]
    base = {"model": str(model), "threads": threads, "texts": texts, "call_size": n}
    timeout = 900

    def ours(**kw: Any) -> dict[str, Any]:
        # The task's defaults: one batch at a time on min(4, cores) threads (intra_threads 0, inter_threads
        # 1), `batch_size` notes per model call (8). Two batches at once on one thread each is a little
        # faster on 2 cores but needs ~0.5 GB more with Qwen 0.5B (rows `.../inter_threads=N`).
        job = {**base, "threads": threads, "inter_threads": 1, "static_prompt": True,
               "batch_size": GeneratorTaskConfig.model_fields["batch_size"].default, **kw}
        return _spawn(sys.executable, "ours", job, timeout)

    def rate(r: dict[str, Any]) -> float:
        return round(n / r["wall_s"], 3)

    def agreement(r: dict[str, Any], peer: dict[str, Any]) -> float:
        """Share of the notes whose values (all fields) are equal on both sides."""
        return round(sum(a == b for a, b in zip(r["values"], peer["values"], strict=True)) / n, 3)

    def cpu_ms(r: dict[str, Any]) -> float:
        return round(r["cpu_s"] / n * 1000, 1)

    common = {"model": name, "gguf": gguf_name(name), "notes": n, "threads": threads,
              "fields": list(_DEFAULT_FIELDS), "max_field_tokens": MAX_FIELD_TOKENS,
              "static_prompt_tokens": len(prompter.static)}
    rows: list[dict[str, Any]] = []
    why_not = _peer_available()
    rounds = 1 if quick else 2
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    peer_job = None if why_not else {
        "gguf": str(gguf_path(name)), "threads": threads, "prompts": prompts, "fields": list(_DEFAULT_FIELDS),
        "keys": prompter.keys, "eos_ids": sorted(prompter.eos_ids), "max_field_tokens": MAX_FIELD_TOKENS}
    for r in range(rounds):
        for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            if side == "ours":
                runs["ours"].append(ours())
            elif peer_job is not None:
                runs["peer"].append(_spawn(LLAMA_PYTHON, "peer", peer_job, timeout))
    best = min(runs["ours"], key=lambda x: x["wall_s"])
    row: dict[str, Any] = {"name": "generate_notes_per_s" + suffix, "unit": "notes/s", "ours": rate(best),
                           "peer": None,
                           "peer_name": f"llama-cpp-python, same GGUF weights ({gguf_name(name)}), same prompts "
                                        "and procedure",
                           "ours_cpu_ms_per_note": cpu_ms(best), "ours_threads": f"inter 1 x intra {threads}",
                           "peer_threads": f"n_threads {threads}", **common}
    if runs["peer"]:
        peer = min(runs["peer"], key=lambda x: x["wall_s"])
        row.update(peer=rate(peer), peer_cpu_ms_per_note=cpu_ms(peer), llama_cpp=peer["llama_cpp"],
                   rounds=rounds, ours_rounds=[rate(x) for x in runs["ours"]],
                   peer_rounds=[rate(x) for x in runs["peer"]],
                   agreement=agreement(best, peer))
    else:
        row["peer_missing"] = why_not
    row["ours_peak_rss_mb"] = best["peak_rss_mb"]
    rows.append(row)
    if runs["peer"]:
        # The other thread layout against the same peer run: two batches at once on one thread each. Faster
        # on 2 cores, but each batch in flight holds its own prompt state (Qwen 0.5B: ~1.9 vs ~1.45 GB).
        inter = ours(threads=1, inter_threads=threads)
        rows.append({**row, "name": f"generate_notes_per_s{suffix}/inter_threads={threads}", "ours": rate(inter),
                     "ours_cpu_ms_per_note": cpu_ms(inter), "ours_threads": f"inter {threads} x intra 1",
                     "ours_peak_rss_mb": inter["peak_rss_mb"], "ours_rounds": [rate(inter)],
                     "agreement": agreement(inter, peer)})

    # Batching: one note per call (what a daemon does when messages trickle in) vs the batch at once.
    single = ours(call_size=1)
    rows.append({"name": "generate_batching" + suffix, "unit": "notes/s", "ours": rate(best), "peer": rate(single),
                 "peer_name": "ours, one note per call", "ours_cpu_ms_per_note": cpu_ms(best),
                 "peer_cpu_ms_per_note": cpu_ms(single),
                 "batch_invariant": best["values"] == single["values"], **common})
    if not extra_rows:
        return rows
    if not quick and peer_job is not None:
        # One thread each: less at the mercy of the other tenants of a 2-core machine (no thread barriers).
        one_ours = ours(threads=1, inter_threads=1)
        one_peer = _spawn(LLAMA_PYTHON, "peer", {**peer_job, "threads": 1}, timeout)
        rows.append({"name": "generate_notes_per_s_1_thread", "unit": "notes/s", "ours": rate(one_ours),
                     "peer": rate(one_peer), "peer_name": row["peer_name"], "ours_cpu_ms_per_note": cpu_ms(one_ours),
                     "peer_cpu_ms_per_note": cpu_ms(one_peer), **common, "threads": 1})

    # The prompt cache: the same run without static_prompt (the whole prompt forwarded for every field).
    nocache = ours(static_prompt=False)
    rows.append({"name": "generate_prompt_cache", "unit": "notes/s", "ours": rate(best), "peer": rate(nocache),
                 "peer_name": "ours without static_prompt", "ours_cpu_ms_per_note": cpu_ms(best),
                 "peer_cpu_ms_per_note": cpu_ms(nocache), **common})
    return rows


# ---------------------------------------------------------------- accuracy sanity (MaintIE)

FIELD_TYPES = {"asset": "PhysicalObject", "symptom": "State", "action": "Activity"}


def _gold_spans(row: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(top type, char start, char end) of the gold entities (the text is the tokens joined by spaces)."""
    starts, ends, pos = [], [], 0
    for tok in row["tokens"]:
        starts.append(pos)
        ends.append(pos + len(tok))
        pos += len(tok) + 1
    return [(e["top_type"], starts[e["start"]], ends[e["end"] - 1]) for e in row["entities"]]


def accuracy(n: int = 40) -> dict[str, Any]:
    """Grounding on n MaintIE notes (evenly spaced over the release's last 10 %, the tagger's test part).
    Matching rule: asset ~ PhysicalObject, symptom ~ State, action ~ Activity; a grounded value `overlaps`
    when its character span intersects a gold span of that type, `exact` when it equals one."""
    from edge_agent.config import GeneratorTaskConfig
    from edge_agent.message import Note
    from edge_agent.tasks.generator import GeneratorTask

    rows = sorted((json.loads(line) for line in MAINTIE.read_text(encoding="utf-8").splitlines()),
                  key=lambda r: r["id"])
    # 5 rows of the release have normalised tokens ("cab" -> "cabin"): their gold spans cannot be placed.
    test = [r for r in rows[len(rows) * 9 // 10 :] if r["text"] == " ".join(r["tokens"])]
    picked = [test[i * len(test) // n] for i in range(n)]
    task = GeneratorTask("acc", GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(MODEL)}))
    t0 = time.perf_counter()
    results = task.process([Note(text=r["text"], topic="bench") for r in picked])
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"notes": n, "rule": accuracy.__doc__, "seconds": round(wall, 1), "fields": {}}
    for field, gold_type in FIELD_TYPES.items():
        c = {"grounded": 0, "ungrounded": 0, "null": 0, "overlaps_gold": 0, "exact_gold": 0, "gold_has_type": 0}
        for r, res in zip(picked, results, strict=True):
            gold = [(s, e) for t, s, e in _gold_spans(r) if t == gold_type]
            c["gold_has_type"] += bool(gold)
            span = res["fields"][field]
            if span is None:
                c["ungrounded" if field in res["ungrounded"] else "null"] += 1
                continue
            c["grounded"] += 1
            c["overlaps_gold"] += any(span["start"] < e and s < span["end"] for s, e in gold)
            c["exact_gold"] += (span["start"], span["end"]) in gold
        out["fields"][field] = c
    out["examples"] = [{"text": r["text"], **res} for r, res in list(zip(picked, results, strict=True))[:8]]
    task.close()
    return out


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role in ("ours", "peer"):
        job = json.loads(sys.stdin.read())
        print(json.dumps((child_ours if role == "ours" else child_peer)(job)))
    elif role == "accuracy":
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 40
        print(json.dumps(accuracy(n), indent=2))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    main()
