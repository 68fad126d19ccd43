"""Convert Hugging Face weights into a CTranslate2 model directory's files (torch and transformers inside).

This is the part of `edge-agent models build` that needs the `convert` extra (torch, transformers,
accelerate, gguf). They are imported inside the functions only, so importing this module loads nothing
beyond the standard library. `models` stages a directory, calls `convert_encoder` or `convert_generator`
to fill it, and writes the manifest; the metadata they return goes into that manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ModelError

Progress = Callable[[str], None]


def quiet_transformers() -> None:
    """Offline, and no progress bars of its own: progress goes through our callback."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise ModelError("building models needs the conversion tools: pip install 'edge-agent[convert]' "
                         f"({e})") from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _patched_source(src: Path, config: dict[str, Any], work: Path) -> Path:
    """src as is, or a folder of links to it with a fixed config.json.

    transformers 5 writes BERT/XLM-R configs without `position_embedding_type`, which the CTranslate2
    loaders read; "absolute" is the only kind they convert.
    """
    if config.get("model_type") not in ("bert", "xlm-roberta") or "position_embedding_type" in config:
        return src
    work.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "config.json":
            (work / p.name).symlink_to(p)
    (work / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    return work


def _ct2_convert(src: Path, stage: Path, quantization: str, say: Progress) -> None:
    quiet_transformers()
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class: Any, path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, path, **kwargs)
            _adapt_for_ct2(model)
            return model

    say(f"converting to CTranslate2 {quantization}")
    try:
        with warnings.catch_warnings():
            # the tools' own deprecations (ctranslate2 reading transformers 4 names): nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            Converter(str(src), low_cpu_mem_usage=True).convert(str(stage), quantization=quantization, force=True)
    except (ValueError, AssertionError, AttributeError, KeyError, OSError, NotImplementedError) as e:
        hint = "" if (src / "tokenizer.json").is_file() else (
            " (this folder has no tokenizer.json: making one from tokenizer.model needs sentencepiece and protobuf)")
        raise ModelError(f"CTranslate2 could not convert {src}: {type(e).__name__}: {e}{hint}") from e


def _adapt_for_ct2(model: Any) -> None:
    """Give ctranslate2 4.8's loaders the transformers 4 names they read.

    transformers 5 keeps RoPE settings only in `rope_parameters` (`rope_scaling` is an alias of it), while
    the Gemma/Gemma 2/Gemma 3/Phi-3 loaders read `config.rope_theta` and would silently fall back to a
    default base; the Phi-3 loader also expects `rope_scaling["type"]` and a per-layer `rotary_emb`.
    The tests compare the converted logits with transformers' to catch a wrong base.
    """
    config = model.config
    text = getattr(config, "text_config", None) or config
    params = dict(getattr(text, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma 3: one RoPE per layer type
        full, local = params["full_attention"], params.get("sliding_attention", {})
        if full.get("rope_type", "default") != "default":
            raise ModelError("Gemma 3 with RoPE scaling (the 4B and larger models) is not supported by "
                             "CTranslate2's converter; the 270M and 1B models are")
        text.rope_theta = full["rope_theta"]
        text.rope_local_base_freq = local.get("rope_theta", 10_000)
    elif "rope_theta" in params:
        text.rope_theta = params["rope_theta"]
    scalar = getattr(text, "query_pre_attn_scalar", None)  # Gemma 2/3: ctranslate2 scales by head_dim
    if scalar is not None and scalar != getattr(text, "head_dim", scalar):
        raise ModelError(f"query_pre_attn_scalar={scalar} differs from head_dim={text.head_dim} (e.g. Gemma 2 "
                         "27B); CTranslate2's converter does not support that")
    if getattr(config, "model_type", None) == "phi3":
        if params.get("partial_rotary_factor", 1.0) != 1.0:  # Phi-4-mini; the loader rotates every dim
            raise ModelError("Phi-3 configs with partial_rotary_factor != 1 are not supported by "
                             "CTranslate2's converter")
        rope_type = params.get("rope_type", "default")
        factors = {"long_factor": None, "short_factor": None}
        if rope_type != "default":
            factors = {k: params.get(k) for k in factors}
        for layer in model.model.layers:
            layer.self_attn.rotary_emb = SimpleNamespace(**factors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            config.rope_scaling = None if rope_type == "default" else {**params, "type": rope_type}


def convert_encoder(src: Path, stage: Path, quantization: str, say: Progress) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="edge-agent-src-") as tmp:
        _ct2_convert(_patched_source(src, config, Path(tmp) / "src"), stage, quantization, say)
    _copy_tokenizer(src, stage, generator=False)
    # The longest input the encoder was trained for: sentence-transformers records it, else the positions.
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") == "xlm-roberta":
        positions -= int(config.get("pad_token_id", 1)) + 1  # RoBERTa positions start after the pad id
    st_config = src / "sentence_bert_config.json"
    if st_config.is_file():
        positions = min(positions, int(json.loads(st_config.read_text()).get("max_seq_length", positions)))
    return {"model_type": config.get("model_type"), "max_length": positions, **_tool_versions()}


def dequantize_gguf(src: Path, dest: Path, say: Progress) -> Path:
    """GGUF (quantized) -> a float32 Hugging Face folder, tokenizer and chat template included."""
    quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(src.glob("*.gguf"))
    say(f"dequantizing {gguf.name} with transformers")
    try:  # needs the gguf and accelerate packages besides transformers
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    except (ImportError, ValueError, OSError) as e:
        raise ModelError(f"cannot read {gguf.name}: {e}; pip install 'edge-agent[convert]'") from e
    # Saving would otherwise re-declare the folder as GGUF-quantized and the converter would refuse it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    return dest


def convert_generator(src: Path, stage: Path, quantization: str, say: Progress) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _ct2_convert(src, stage, quantization, say)
    _copy_tokenizer(src, stage, generator=True)
    text_config = config.get("text_config") or config
    max_length = text_config.get("max_position_embeddings")
    if config.get("model_type") == "gemma3_text" and text_config.get("sliding_window"):
        # ctranslate2 4.8 mixes up Gemma 3's local (sliding) and global layers once a sequence outgrows
        # the window (measured against transformers): keep prompt + output inside it.
        max_length = min(max_length or 1 << 30, int(text_config["sliding_window"]))
    return {"model_type": config.get("model_type"), "max_length": max_length, **_tool_versions()}


def _copy_tokenizer(src: Path, stage: Path, *, generator: bool) -> None:
    """tokenizer.json always (made by transformers when the folder has only a slow tokenizer); for a
    generator also tokenizer_config.json with its chat template, and generation_config.json."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", stage / "tokenizer.json")
    else:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(tmp)
            if not (Path(tmp) / "tokenizer.json").is_file():
                raise ModelError(f"{src}: its tokenizer has no fast (tokenizer.json) form; the runtime "
                                 "needs tokenizer.json")
            shutil.copyfile(Path(tmp) / "tokenizer.json", stage / "tokenizer.json")
    if not generator:
        return
    tok_config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    if (src / "chat_template.jinja").is_file():  # transformers 5 keeps the template in its own file
        tok_config["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
    (stage / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", stage / "generation_config.json")


def _tool_versions() -> dict[str, Any]:
    from importlib.metadata import version

    return {"converter": {pkg: version(pkg) for pkg in ("ctranslate2", "transformers", "torch")}}
