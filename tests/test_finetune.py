"""`edge-agent finetune generator` on a tiny random Qwen2 (hidden 32, 2 layers, a byte-level BPE tokenizer of
a few hundred pieces trained here, ChatML): examples -> LoRA -> merged -> int8 model directory with its
manifest -> loaded and run by the daemon's GeneratorTask. Needs torch, transformers and peft (the `train`
extra); skipped without them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edge_agent.cli.main import main
from edge_agent.config import _DEFAULT_FIELDS, GeneratorTaskConfig
from edge_agent.errors import InputError
from edge_agent.message import Note
from edge_agent.models.manifest import verify

EXAMPLES = [
    {"text": "Pump P-101 leaking at mechanical seal, replaced seal",
     "fields": {"asset": "Pump P-101", "symptom": "leaking", "action": "replaced seal"}},
    {"text": "conveyor 3 belt torn, replace belt", "fields": {"asset": "belt", "symptom": "torn",
                                                            "action": "replace belt"}},
    {"text": "motor M-7 overheating", "fields": {"asset": "motor M-7", "symptom": "overheating"}},
    {"text": "greased bearings on fan F-2", "fields": {"asset": "fan F-2", "symptom": None,
                                                       "action": "greased bearings"}},
    {"text": "hyd hose burst on loader", "fields": {"asset": "hyd hose", "symptom": "burst", "action": None}},
    {"text": "change filter element on compressor C-1",
     "fields": {"asset": "compressor C-1", "action": "change filter element"}},
    {"text": "valve V-12 fails to close", "fields": {"asset": "valve V-12", "symptom": "fails to close"}},
    {"text": "gearbox noisy, check oil level", "fields": {"asset": "gearbox", "symptom": "noisy",
                                                         "action": "check oil level"}},
    {"text": "replaced fuse in panel B", "fields": {"asset": "panel B", "action": "replaced fuse"}},
    {"text": "air con not working in crib room", "fields": {"asset": "air con", "symptom": "not working"}},
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _need_train_extra() -> None:
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 HF folder with a ChatML byte-level BPE tokenizer, built as a generator
    (`models build --from-hf`): its manifest names the folder, as a real --from-hf build's does."""
    _need_train_extra()
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edge_agent.models import build
    from edge_agent.tasks.prompt import EXAMPLE_NOTE, SYSTEM

    root = tmp_path_factory.mktemp("tiny-qwen2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM, EXAMPLE_NOTE, *(json.dumps(ex) for ex in EXAMPLES), *_DEFAULT_FIELDS.values()] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=CHATML)
    src = root / "hf"
    fast.save_pretrained(src)
    torch.manual_seed(0)
    config = tf.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=tok.get_vocab_size(), max_position_embeddings=1024,
                            tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|im_end|>"),
                            pad_token_id=tok.token_to_id("<|endoftext|>"))
    tf.Qwen2ForCausalLM(config).save_pretrained(src)
    return build.build_from_hf(src, root / "base", name="tiny-qwen2")


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "examples.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES), encoding="utf-8")
    return path


def test_the_shared_prefix_loss_equals_the_plain_forward(tiny_base: Path) -> None:
    """_batch_loss forwards the static prompt once for the batch: the same loss (and so the same gradient)
    as forwarding each prompt + answer whole, right-padded, loss on the answer tokens."""
    _need_train_extra()
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from edge_agent.tasks.prompt import Prompter
    from edge_agent.train import finetune_generator as ft

    hf = verify(tiny_base)["source"]["file"]
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                                peft.LoraConfig(r=4, target_modules=list(ft.TARGET_MODULES), lora_dropout=0.0))
    prompter = Prompter(tiny_base, dict(_DEFAULT_FIELDS))
    encoded = [ft.encode_example(prompter, "<|im_end|>", ex) for ex in ft.check_examples(EXAMPLES[:4],
                                                                                          _DEFAULT_FIELDS)]
    static = [prompter.vocab[t] for t in prompter.static]
    prompt, answer = encoded[0]
    assert prompt[: len(static)] == static and answer[-1] == prompter.vocab["<|im_end|>"]
    # The answer is the rest of the values' JSON after the first key, as the skeleton continues it.
    assert prompter.tokenizer.decode(prompt[-4:] + answer, skip_special_tokens=True).endswith(
        '"asset": "Pump P-101", "symptom": "leaking", "action": "replaced seal"}')
    with torch.no_grad():
        shared, n = ft._batch_loss(model.eval(), static, encoded)
        plain = 0.0
        for p, a in encoded:
            logits = model(input_ids=torch.tensor([p + a])).logits[0]
            plain += torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(a), reduction="sum")
    assert n == sum(len(a) for _, a in encoded)
    assert abs(shared.item() - float(plain)) < 1e-3 * float(plain)


def test_finetune_exports_a_verified_int8_generator_the_task_runs(tiny_base: Path, examples_file: Path,
                                                                   tmp_path: Path, capsys) -> None:
    _need_train_extra()
    from edge_agent.tasks.generator import GeneratorTask

    out = tmp_path / "tiny-ft"
    rc = main(["finetune", "generator", "--model", str(tiny_base), "--examples", str(examples_file), "--out",
               str(out), "--epochs", "4", "--lr", "5e-3", "--rank", "4", "--batch-size", "4", "--threads", "2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = verify(out)
    tune = manifest["finetune"]
    assert manifest["kind"] == "generator" and manifest["quantization"] == "int8" and manifest["name"] == "tiny-ft"
    assert manifest["source"]["finetuned_from"] == "tiny-qwen2"
    assert tune["base"]["name"] == "tiny-qwen2" and tune["base"]["source"] == verify(tiny_base)["source"]
    assert tune["examples"] == {"file": "examples.jsonl", "format": "edge-agent", "rows": 10, "used": 10,
                                "sha256": hashlib.sha256(examples_file.read_bytes()).hexdigest()}
    assert (tune["method"], tune["rank"], tune["epochs"], tune["lr"], tune["steps"]) == ("lora", 4, 4, 5e-3, 12)
    assert tune["fields"] == dict(_DEFAULT_FIELDS)
    assert tune["loss_after"] < tune["loss_before"] and tune["epoch_loss"][-1] < tune["epoch_loss"][0]
    assert printed["loss_after"] == tune["loss_after"]
    for name in ("model.bin", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert name in manifest["files"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()

    cfg = GeneratorTaskConfig.model_validate({"kind": "generator", "model": str(out), "intra_threads": 1,
                                              "max_field_tokens": 6})
    task = GeneratorTask("extract", cfg)
    try:
        results = task.process([Note(text=ex["text"], topic="t") for ex in EXAMPLES[:3]])
    finally:
        task.close()
    assert [sorted(r["fields"]) for r in results] == [sorted(_DEFAULT_FIELDS)] * 3  # check_result passed too


def test_examples_whose_values_are_not_in_the_text_exit_2(tmp_path: Path, capsys) -> None:
    from edge_agent.train.finetune_generator import check_examples

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "pump leaking", "fields": {"asset": "motor"}}) + "\n")
    with pytest.raises(InputError, match="does not occur in the text"):
        check_examples([json.loads(bad.read_text())], dict(_DEFAULT_FIELDS))
    with pytest.raises(InputError, match="not one of the task's fields"):
        check_examples([{"text": "pump", "fields": {"cause": "pump"}}], dict(_DEFAULT_FIELDS))
    _need_train_extra()
    rc = main(["finetune", "generator", "--model", str(tmp_path), "--examples", str(bad), "--out",
               str(tmp_path / "out")])
    assert rc == 2 and "does not occur in the text" in capsys.readouterr().err


def test_maintie_rows_become_first_span_examples() -> None:
    from edge_agent.train.finetune_generator import from_maintie

    row = {"tokens": ["air", "filters", "plugged", ",", "replace"],
           "entities": [{"start": 1, "end": 2, "type": "PhysicalObject"}, {"start": 0, "end": 2,
                                                                          "type": "PhysicalObject"},
                        {"start": 2, "end": 3, "type": "State/Undesirable"}, {"start": 4, "end": 5,
                                                                              "type": "Activity/Repair"}]}
    assert from_maintie(row) == {"text": "air filters plugged , replace",
                                 "fields": {"asset": "air filters", "symptom": "plugged", "action": "replace"}}
    row["entities"] = row["entities"][:2]
    assert from_maintie(row)["fields"] == {"asset": "air filters", "symptom": None, "action": None}
