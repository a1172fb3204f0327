"""The model factory of the training stages: a causal LM whose vocabulary holds every S-ID token.

Two ways to get one, both ending in a ``save_pretrained`` directory that every later stage
loads like any Hugging Face model (nothing here ever downloads):

* **a local checkpoint** (``base_model=/path/to/Qwen2.5-0.5B``, or the output of
  ``leadre base-model``): its tokenizer gets the S-ID tokens as atomic added tokens, its
  embeddings grow when needed, and the new rows are drawn around the mean of the real
  vocabulary's rows, so they start as "an average token" rather than noise (also when the
  checkpoint's matrix is padded past its tokenizer and no resize happens);
* **from scratch** (``base_model=None``): a byte-level BPE tokenizer is trained in memory on the
  prompt corpus with the ``tokenizers`` library, the S-ID tokens are added on top, and a small
  Llama-family model of a preset size is initialised from a config.

S-IDs are written without spaces (``<a_12><b_6><c_22><d_36><e_0>``), so each S-ID token is
exactly one token id. ``load_tokenizer`` reads ``tokenizer.json`` verbatim: ``AutoTokenizer``
on a ``model_type: qwen2`` directory silently swaps in Qwen2's tokenizer class, which
re-splits digits and changes tokenization.

Layout of a training stage directory (``leadre sft`` / ``leadre dpo``)::

    <out>/model/    the base model with S-ID tokens + tokenizer (what the adapter applies to)
    <out>/adapter/  PEFT LoRA adapter (absent after a full fine-tune)
    <out>/merged/   adapter merged into the base + tokenizer: plain transformers loads it
    <out>/ray/      Ray Train run storage (checkpoints)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from leadre.artifacts import MANIFEST, ArtifactError, read_manifest
from leadre.sids.table import SID_TOKEN

if TYPE_CHECKING:  # transformers costs seconds to import; only the functions below need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MODEL_DIR, ADAPTER_DIR, MERGED_DIR, RAY_DIR = "model", "adapter", "merged", "ray"


@dataclass(frozen=True)
class Preset:
    """Size of a model built from scratch (Llama architecture, untied LM head so the LM head
    can be trained as its own module next to a LoRA adapter)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # BPE vocabulary before the S-ID tokens are added
    max_position_embeddings: int


PRESETS: dict[str, Preset] = {
    # tests and the demo: ~0.2 M parameters, one optimiser step in milliseconds on a CPU
    "tiny": Preset(64, 128, 2, 4, 4, 512, 1024),
    # a real catalog on 2 CPU cores (Amazon Scientific): ~1 M parameters; a step of 2 x 16
    # examples takes 0.55 s there (tiny 0.16 s, small 1.3 s, which leaves no budget for epochs)
    "base": Preset(128, 384, 3, 4, 4, 1024, 1024),
    # real runs on a laptop CPU or a small GPU: ~5 M parameters (+ 2 x 256 per S-ID token)
    "small": Preset(256, 704, 4, 4, 2, 4096, 2048),
}
PresetName = Literal["tiny", "base", "small"]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], sid_tokens: list[str], vocab_size: int
                    ) -> "PreTrainedTokenizerBase":
    """A byte-level BPE tokenizer trained on ``texts`` (S-ID tokens stripped first, so no merge
    is wasted on pieces of them), with ``<s>``, ``</s>``, ``<pad>`` as special tokens and the
    S-ID tokens as atomic added tokens. No post-processor: TRL appends EOS itself."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((SID_TOKEN.sub(" ", t) for t in texts), trainer)
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in sid_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """The tokenizer of a model directory, read verbatim from its ``tokenizer.json`` when it
    has one (see the Qwen2 trap in the module docstring); otherwise ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token is None:
        raise ArtifactError(f"the tokenizer in {path} has no EOS token: generation could not stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def add_sid_tokens(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                   sid_tokens: list[str], init: dict[str, Any] | None = None) -> int:
    """Add the S-ID tokens missing from ``tokenizer`` as atomic tokens, grow the model's
    embeddings (and untied LM head) when they have fewer rows than the tokenizer needs, and
    mean-initialise the new tokens' rows; returns how many tokens were new.

    The rows are re-initialised even where no resize happens: checkpoints often pad their
    embedding matrix past the tokenizer (to a multiple of 64 or 128), and the first new ids
    then land on those untrained padding rows."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in sid_tokens if t not in vocab]
    if new:
        trained = len(tokenizer)  # rows below this hold the checkpoint's real vocabulary
        tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in new])
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = tokenizer.convert_tokens_to_ids(new)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        mean_init_rows(emb.weight, ids, trained)
        if head is not None and head.weight is not emb.weight:
            mean_init_rows(head.weight, ids, trained)
    if init:
        codebook_init_rows(model, tokenizer, init)
    _sync_special_ids(model, tokenizer)
    return len(new)


def codebook_init_rows(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                       vectors: dict[str, Any]) -> int:
    """Start the rows of the S-ID tokens in ``vectors`` (token -> its code vector) from those
    vectors: centred per level, projected onto their top principal directions (as many as
    the hidden size; zero-padded when fewer), and scaled so a row's norm matches the mean
    norm of the vocabulary's rows. Codes that are close in the quantiser's space then start
    close in the model's, instead of all starting as the same average token. Applied to the
    input embeddings and an untied LM head; returns how many rows were set."""
    import numpy as np
    import torch

    vocab = tokenizer.get_vocab()
    known = [t for t in vectors if t in vocab]
    if not known:
        return 0
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = emb.weight.shape[1]
    by_level: dict[str, list[str]] = {}
    for t in known:
        by_level.setdefault(SID_TOKEN.fullmatch(t).group(1), []).append(t)
    rows, ids = [], []
    for toks in by_level.values():
        x = np.stack([np.asarray(vectors[t], np.float64) for t in toks])
        x = x - x.mean(0)
        u, sv, _ = np.linalg.svd(x, full_matrices=False)
        proj = (u * sv)[:, :hidden]
        proj = np.pad(proj, ((0, 0), (0, hidden - proj.shape[1])))
        norms = np.linalg.norm(proj, axis=1, keepdims=True)
        rows.append(proj / max(float(norms.mean()), 1e-12))  # mean row norm 1 per level
        ids += tokenizer.convert_tokens_to_ids(toks)
    unit = torch.as_tensor(np.concatenate(rows), dtype=torch.float32)
    index = torch.as_tensor(ids)
    sid_ids = set(vocab[t] for t in vocab if SID_TOKEN.fullmatch(t))
    trained = [i for i in range(min(len(tokenizer), emb.weight.shape[0])) if i not in sid_ids]
    weights = [emb.weight]
    if head is not None and head.weight is not emb.weight:  # an untied LM head
        weights.append(head.weight)
    with torch.no_grad():
        for w in weights:
            scale = w[trained].float().norm(dim=1).mean()
            w[index.to(w.device)] = (unit * scale).to(w.device, w.dtype)
    return len(ids)


def mean_init_rows(weight: Any, ids: list[int], trained: int) -> None:
    """Rows ``ids`` of ``weight`` drawn from N(mean, 1e-9 * covariance) of its first
    ``trained`` rows (so each new token starts as "an average token", not noise, and the rows
    still differ), or set to the mean where that covariance is not positive definite. The
    same rule as transformers' ``mean_resizing``, but over the real vocabulary only: the
    padding rows of a padded matrix are not part of the distribution."""
    import torch

    with torch.no_grad():
        old = weight[:trained].to(torch.float32)
        mean = old.mean(0)
        centered = old - mean
        cov = 1e-9 * (centered.T @ centered) / trained
        try:
            rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample(
                (len(ids),))
        except (ValueError, RuntimeError):  # not positive definite
            rows = mean.expand(len(ids), -1)
        weight[torch.as_tensor(ids, device=weight.device)] = rows.to(weight.device, weight.dtype)


# --------------------------------------------------------------------------- prompts


def render_prompts(tokenizer: "PreTrainedTokenizerBase", prompts: Iterable[str]) -> list[str]:
    """The text a model sees for each prompt: the prompt as the user turn of the tokenizer's
    chat template, followed by the assistant header (the answer, an S-ID, comes next), or the
    prompt itself when the tokenizer has no template (models built from scratch). The SFT and
    DPO trainers, the length check and the constrained decoder (offline evaluation and
    serving) all render through this function, so training and inference see the same
    tokens."""
    prompts = list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        return prompts
    return tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                         tokenize=False, add_generation_prompt=True)


def _sync_special_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id
        if getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = tokenizer.eos_token_id


def with_rendered_prompts(table: Any, tokenizer: "PreTrainedTokenizerBase") -> Any:
    """A pyarrow ``table`` with its ``prompt`` column passed through :func:`render_prompts`
    (``None`` and template-less tokenizers pass through unchanged)."""
    if table is None or not getattr(tokenizer, "chat_template", None):
        return table
    import pyarrow as pa

    rendered = render_prompts(tokenizer, table.column("prompt").to_pylist())
    return table.set_column(table.schema.get_field_index("prompt"), "prompt",
                            pa.array(rendered, pa.string()))


# --------------------------------------------------------------------------- model


def build_model(preset: PresetName, tokenizer: "PreTrainedTokenizerBase", seed: int = 0
                ) -> "PreTrainedModel":
    """A freshly initialised Llama-family causal LM sized by ``preset`` for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size, num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _sync_special_ids(model, tokenizer)
    return model


def load_model(path: str | Path, dtype: Any = None) -> "PreTrainedModel":
    """``AutoModelForCausalLM`` from a local directory, float32 unless ``dtype`` says
    otherwise (transformers 5 would otherwise take the dtype from the config)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                local_files_only=True)


def prepare_base_model(out_dir: str | Path, *, sid_tokens: list[str], base_model: str | None,
                       preset: PresetName, corpus: Iterable[str] | None = None,
                       vocab_size: int | None = None, seed: int = 0,
                       sid_vectors: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out_dir``: the base model with every S-ID token in its vocabulary, plus its
    tokenizer. ``base_model`` is a local causal-LM directory; ``None`` builds the ``preset``
    from scratch with a tokenizer trained on ``corpus``. ``sid_vectors`` (token -> code
    vector) starts those tokens' rows from their codebook vectors
    (:func:`codebook_init_rows`); otherwise they start as an average token. Returns facts for
    the manifest."""
    out_dir = Path(out_dir)
    packaged = None
    if base_model is not None:
        if not (Path(base_model) / "config.json").exists():
            raise ArtifactError(f"base_model {base_model} is not a local model directory (no "
                                "config.json); nothing is downloaded, so give a saved model")
        tokenizer = load_tokenizer(base_model)
        model = load_model(base_model, dtype="auto")
        added = add_sid_tokens(model, tokenizer, sid_tokens, sid_vectors)
        source = str(Path(base_model).resolve())
        if (Path(base_model) / MANIFEST).exists():  # a `leadre base-model` output
            packaged = read_manifest(base_model).get("source")
    else:
        if corpus is None:
            raise ValueError("building a model from scratch needs a corpus for its tokenizer")
        tokenizer = train_tokenizer(corpus, sid_tokens, vocab_size or PRESETS[preset].vocab_size)
        model = build_model(preset, tokenizer, seed)
        if sid_vectors:
            codebook_init_rows(model, tokenizer, sid_vectors)
        added = len(sid_tokens)
        source = f"preset:{preset}"
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {"source": source, "vocab_size": len(tokenizer), "sid_tokens_added": added,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "model_type": model.config.model_type,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "sid_init": "codebook" if sid_vectors else "mean"}
    if base_model is not None and packaged:
        info["packaged_source"] = packaged
    if base_model is None:
        info["preset"] = asdict(PRESETS[preset])
    return info


def embedding_module_names(model: "PreTrainedModel") -> tuple[str, str | None, bool]:
    """(input-embedding module name, output-embedding module name or None, tied?) as leaf
    names PEFT's ``modules_to_save`` understands (``embed_tokens``, ``lm_head`` for Llama/Qwen)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return names[id(emb)], (names.get(id(head)) if head is not None else None), tied


# --------------------------------------------------------------------------- inference


def load_for_inference(stage_dir: str | Path, device: str | None = None, dtype: Any = None
                       ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(model, tokenizer) of a ``leadre sft`` / ``leadre dpo`` output: the merged model in eval
    mode on ``device`` (default: cuda when available), tokenizer padded on the left for batched
    generation."""
    import torch

    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest.get("stage") not in ("sft", "dpo"):
        raise ArtifactError(f"{stage_dir} holds the output of stage {manifest.get('stage')!r}, "
                            "expected 'sft' or 'dpo'")
    merged = stage_dir / MERGED_DIR
    if not (merged / "config.json").exists():
        raise ArtifactError(f"{merged} is missing: did the {manifest['stage']} run finish?")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() \
            else torch.float32
    model = load_model(merged, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(merged)
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_trained(model_dir: str | Path) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """(model, tokenizer) of whatever generation is pointed at: a ``leadre sft`` / ``leadre
    dpo`` output (:func:`load_for_inference`) or a plain Hugging Face model directory
    (``merged/``, ``model/`` + ``adapter/``, or the directory itself). Never downloads."""
    root = Path(model_dir)
    if (root / MANIFEST).exists() and read_manifest(root).get("stage") in ("sft", "dpo"):
        return load_for_inference(root)
    for sub in (MERGED_DIR, MODEL_DIR, "."):
        cand = root / sub
        if (cand / "config.json").exists():
            model = load_model(cand)
            if sub == MODEL_DIR and (root / ADAPTER_DIR / "adapter_config.json").exists():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(root / ADAPTER_DIR))
            return model, load_tokenizer(cand)
    raise FileNotFoundError(f"{model_dir} holds no model (looked for merged/, model/, config.json)")


def read_training_manifest(stage_dir: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a training stage, with its three model directories checked."""
    manifest = read_manifest(stage_dir, stage=stage)
    for sub in (MODEL_DIR, MERGED_DIR):
        if not (Path(stage_dir) / sub / "config.json").exists():
            raise ArtifactError(f"{stage_dir}/{sub} is missing or incomplete")
    return manifest
