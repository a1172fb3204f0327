"""Text encoders for ads: text in, L2-normalised float32 vectors out.

Two kinds, behind one small interface (``fit`` / ``encode`` / ``save`` / ``load_encoder``):

- ``LsaEncoder`` (the offline default): hashed word uni+bigram TF-IDF, projected onto a
  truncated SVD fitted on the catalog (latent semantic analysis). Needs no download, is
  deterministic for a seed, and was the best offline candidate by nearest-neighbour category
  purity on the Scientific dataset (bench/bench_sids.py, bench/RESULTS.md).
- ``HfEncoder``: any local Hugging Face / sentence-transformers model directory, mean-pooled
  over the attention mask, or a packaged encoder by name (``all-minilm-l6-v2``: a pinned,
  hash-checked model package installed with the environment, see ``leadre.sids.packaged``).
  Loaded with ``local_files_only``, so nothing is downloaded from a model hub.

``embed_texts`` runs an encoder over a catalog, either in-process or on Ray Data with an actor
pool (each actor loads the encoder once from the artifact directory).
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from abc import ABC, abstractmethod
from typing import Literal, Sequence, get_args

import numpy as np
import pyarrow as pa

from leadre.artifacts import ArtifactError, read_bytes, read_json, write_json, write_text


ENCODER_JSON = "encoder.json"
LSA_WEIGHTS = "lsa.npz"
_TOKEN = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
# Randomised SVD: oversampling and power iterations (Halko et al. 2011); 4 iterations make
# the top components indistinguishable from an exact SVD on text matrices.
_SVD_OVERSAMPLE = 16
_SVD_POWER_ITERS = 4


def ad_text(title: str | None, category: str | None, description: str | None) -> str:
    """The text an ad is encoded from: title, category and description (paper, section 3)."""
    return ". ".join(p.strip() for p in (title, category, description) if p and p.strip())


def ad_texts(ads: pa.Table) -> list[str]:
    cols = [ads.column(c).to_pylist() if c in ads.column_names else [None] * ads.num_rows
            for c in ("title", "category", "description")]
    return [ad_text(t, c, d) for t, c, d in zip(*cols)]


class TextEncoder(ABC):
    """Maps texts to L2-normalised float32 vectors of size ``dim``."""

    kind: str
    dim: int

    def fit(self, texts: Sequence[str]) -> "TextEncoder":
        """Learn corpus statistics (a no-op for pretrained models)."""
        return self

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length (all-zero for empty text)."""

    @abstractmethod
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able settings, named arrays) that ``load_encoder`` restores it from."""

    def save(self, location: str) -> None:
        settings, arrays = self.state()
        write_json(location, ENCODER_JSON, {"kind": self.kind, "dim": self.dim, **settings})
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            write_text(location, LSA_WEIGHTS, buf.getvalue())


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Hashed TF-IDF


Analyzer = Literal["word", "word12", "word+char4"]
ANALYZERS: tuple[str, ...] = get_args(Analyzer)


def _terms(text: str, analyzer: str) -> list[str]:
    """Terms of a text: words; plus word bigrams (word12) or in-word char 4-grams."""
    words = _TOKEN.findall(text.lower())
    if analyzer == "word12":
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    if analyzer == "word+char4":
        padded = [f" {w} " for w in words]
        return words + [w[i:i + 4] for w in padded for i in range(max(1, len(w) - 3))]
    return words


def hashed_counts(texts: Sequence[str], n_features: int, analyzer: str = "word"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse term counts as CSR arrays (indptr, indices, counts). crc32, not ``hash()``:
    Python's string hash is salted per process and actors must agree on the buckets."""
    rows, cols = [], []
    for i, text in enumerate(texts):
        h = [zlib.crc32(t.encode()) % n_features for t in _terms(text, analyzer)]
        rows.append(np.full(len(h), i, dtype=np.int64))
        cols.append(np.asarray(h, dtype=np.int64))
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    keys, counts = np.unique(r * n_features + c, return_counts=True)
    r, c = keys // n_features, keys % n_features
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.add.at(indptr, r + 1, 1)
    return np.cumsum(indptr), c, counts.astype(np.float32)


def _csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape: tuple[int, int]):
    import torch

    with warnings.catch_warnings():
        # torch calls sparse CSR "beta" on every construction; CSR @ dense is all we use.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                       torch.from_numpy(values), size=shape)


def _tfidf_csr(texts: Sequence[str], n_features: int, idf: np.ndarray | None, analyzer: str):
    """torch sparse CSR of sublinear-tf x idf rows, L2-normalised; and the raw CSR arrays."""
    indptr, indices, counts = hashed_counts(texts, n_features, analyzer)
    vals = 1.0 + np.log(counts)
    if idf is not None:
        vals = vals * idf[indices]
    row = np.repeat(np.arange(len(texts)), np.diff(indptr))
    norms = np.sqrt(np.bincount(row, weights=vals * vals, minlength=len(texts)))
    vals = (vals / np.maximum(norms[row], 1e-12)).astype(np.float32)
    return _csr(indptr, indices, vals, (len(texts), n_features)), (indptr, indices)


def _compact(x, csr: tuple[np.ndarray, np.ndarray], buckets: np.ndarray):
    """Keep only the columns in ``buckets`` (sorted), renumbered 0..len(buckets)-1."""
    indptr, indices = csr
    pos = np.searchsorted(buckets, indices).clip(max=len(buckets) - 1)
    keep = buckets[pos] == indices
    row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[keep]
    vals = x.values().numpy()[keep]
    new_ptr = np.zeros(len(indptr), dtype=np.int64)
    np.add.at(new_ptr, row + 1, 1)
    return _csr(np.cumsum(new_ptr), pos[keep].astype(np.int64), vals,
                (len(indptr) - 1, len(buckets)))


def smooth_idf(indptr: np.ndarray, indices: np.ndarray, n_docs: int, n_features: int) -> np.ndarray:
    df = np.bincount(indices, minlength=n_features)  # CSR indices are unique per row
    return (np.log((1.0 + n_docs) / (1.0 + df)) + 1.0).astype(np.float32)


def randomized_svd(x, k: int, seed: int):
    """Top-k right singular vectors (n_features, k) of a torch sparse CSR matrix."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt = x.to_sparse_coo().t().coalesce().to_sparse_csr()
    q = torch.randn(x.shape[1], k + _SVD_OVERSAMPLE, generator=g)
    q, _ = torch.linalg.qr(x @ q)
    for _ in range(_SVD_POWER_ITERS):
        q, _ = torch.linalg.qr(xt @ q)
        q, _ = torch.linalg.qr(x @ q)
    b_t = xt @ q                                   # (n_features, k+p) = (Q^T X)^T
    u, s, _ = torch.linalg.svd(b_t, full_matrices=False)
    v = u[:, :k]
    # Sign convention (largest |entry| positive) so the same seed gives the same embedding.
    signs = torch.sign(v[v.abs().argmax(dim=0), torch.arange(v.shape[1])])
    return (v * signs).numpy().astype(np.float32), s[:k].numpy()


class LsaEncoder(TextEncoder):
    """Hashed TF-IDF -> truncated SVD -> L2 norm. Word unigrams by default: on Scientific
    they beat word bigrams and char 4-grams on neighbour purity and fit ~10x faster."""

    kind = "lsa"

    def __init__(self, dim: int = 128, n_features: int = 2 ** 18, analyzer: Analyzer = "word",
                 seed: int = 0, fit_sample: int = 200_000):
        if analyzer not in ANALYZERS:
            raise ValueError(f"analyzer {analyzer!r} not in {ANALYZERS}")
        self.dim, self.n_features, self.analyzer = dim, n_features, analyzer
        self.seed, self.fit_sample = seed, fit_sample
        self.idf: np.ndarray | None = None
        self.buckets: np.ndarray | None = None     # sorted hash buckets seen in fit
        self.components: np.ndarray | None = None  # (len(buckets), dim)

    def fit(self, texts: Sequence[str]) -> "LsaEncoder":
        if len(texts) > self.fit_sample:
            rng = np.random.default_rng(self.seed)
            pick = rng.choice(len(texts), self.fit_sample, replace=False)
            texts = [texts[i] for i in np.sort(pick)]
        _, (indptr, indices) = _tfidf_csr(texts, self.n_features, None, self.analyzer)
        self.idf = smooth_idf(indptr, indices, len(texts), self.n_features)
        # Only buckets seen while fitting can carry weight: factorise the compact matrix
        # (vocabulary-sized, not n_features-sized) and store components for those buckets.
        self.buckets = np.unique(indices)
        x = _compact(*_tfidf_csr(texts, self.n_features, self.idf, self.analyzer), self.buckets)
        # An SVD cannot have more useful components than documents.
        k = min(self.dim, max(len(texts) - 1, 1), len(self.buckets))
        v, _ = randomized_svd(x, k, self.seed)
        if k < self.dim:
            v = np.pad(v, ((0, 0), (0, self.dim - k)))
        self.components = v
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.components is None:
            raise RuntimeError("LsaEncoder.encode before fit")
        import torch

        x = _compact(*_tfidf_csr(texts, self.n_features, self.idf, self.analyzer), self.buckets)
        return _normalize((x @ torch.from_numpy(self.components)).numpy())

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"n_features": self.n_features, "analyzer": self.analyzer, "seed": self.seed},
                {"idf": self.idf, "buckets": self.buckets, "components": self.components})


class HashingEncoder(TextEncoder):
    """Stateless baseline (no fit): hashed TF (no IDF) -> fixed Gaussian random projection.
    Measured against LSA in the benchmark; not a CLI choice because it is clearly worse."""

    kind = "hashing"

    def __init__(self, dim: int = 128, n_features: int = 2 ** 18, seed: int = 0):
        self.dim, self.n_features, self.seed = dim, n_features, seed
        rng = np.random.default_rng(seed)
        self.proj = (rng.standard_normal((n_features, dim)) / np.sqrt(dim)).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        x, _ = _tfidf_csr(texts, self.n_features, None, "word")
        return _normalize((x @ torch.from_numpy(self.proj)).numpy())

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"n_features": self.n_features, "seed": self.seed}, {}


class HfEncoder(TextEncoder):
    """A local transformers model (BERT/MiniLM/e5/bge style) with attention-masked mean pooling."""

    kind = "hf"

    def __init__(self, model_path: str, max_length: int = 128, device: str | None = None,
                 cache_dir: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from leadre.sids.packaged import ENCODERS, resolve_model_path

        # A packaged name is kept as given (not its directory), so a saved encoder re-prepares
        # the same hash-pinned model on any machine that loads it.
        self.model_path, self.max_length, self.cache_dir = model_path, max_length, cache_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        local = resolve_model_path(model_path, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
            self.model = AutoModel.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot load a Hugging Face model from {model_path!r} (it must "
                                "be a local directory with config, weights and tokenizer, or "
                                f"one of the packaged encoders {sorted(ENCODERS)}): {e}"
                                ) from None
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return _normalize(pooled.float().cpu().numpy())

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        # Weights are referenced, not copied: the model directory is the artifact.
        return {"model_path": self.model_path, "max_length": self.max_length,
                "cache_dir": self.cache_dir}, {}


def encoder_version(location: str) -> str:
    """A short name of the encoder saved at ``location`` that changes whenever its vectors
    would: ``<kind>:<model>:<12 hex>`` over its settings, fitted weights (LSA) or the model
    directory's config and weight sizes (hf; a packaged name also pins its weights' sha256).
    Stages that consume vectors or codes record it; a mismatch is refused by name."""
    import hashlib
    import json
    from pathlib import Path

    raw = read_bytes(location, ENCODER_JSON)
    settings = json.loads(raw)
    h = hashlib.sha256(raw)
    name = str(settings.get("dim", ""))
    if settings.get("kind") == "lsa":
        h.update(read_bytes(location, LSA_WEIGHTS))
    elif settings.get("kind") == "hf":
        from leadre.sids.packaged import ENCODERS

        name = settings.get("model_path") or ""
        entry = ENCODERS.get(name)
        if entry is not None:
            h.update(f"{entry.version}:{entry.weights_sha256}".encode())
        else:
            local = Path(name)
            name = local.name
            for f in sorted(local.glob("*")) if local.is_dir() else []:
                h.update(f.name.encode() + str(f.stat().st_size).encode())
                if f.name == "config.json":
                    h.update(f.read_bytes())
    return f"{settings.get('kind')}:{name}:{h.hexdigest()[:12]}"


def load_encoder(location: str, device: str | None = None) -> TextEncoder:
    """Restore an encoder that ``TextEncoder.save`` wrote to ``location``."""
    settings = read_json(location, ENCODER_JSON)
    try:
        kind = settings["kind"]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{location}/{ENCODER_JSON} is corrupt: {e}") from None
    if kind == "hf":
        return HfEncoder(settings["model_path"], settings.get("max_length", 128), device,
                         settings.get("cache_dir"))
    if kind == "hashing":
        return HashingEncoder(settings["dim"], settings["n_features"], settings["seed"])
    if kind != "lsa":
        raise ArtifactError(f"{location}/{ENCODER_JSON}: unknown encoder kind {kind!r}")
    try:
        enc = LsaEncoder(settings["dim"], settings["n_features"], settings["analyzer"],
                         settings["seed"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{location}/{ENCODER_JSON} is corrupt: {e}") from None
    raw = read_bytes(location, LSA_WEIGHTS)
    try:
        arrays = np.load(io.BytesIO(raw), allow_pickle=False)
        enc.idf, enc.buckets = arrays["idf"], arrays["buckets"]
        enc.components = arrays["components"]
    except (ValueError, KeyError, OSError, EOFError) as e:
        raise ArtifactError(f"{location}/{LSA_WEIGHTS} is corrupt: {e}") from None
    if (enc.components.shape != (len(enc.buckets), enc.dim) or enc.idf.shape != (enc.n_features,)
            or enc.buckets.ndim != 1):
        raise ArtifactError(f"{location}/{LSA_WEIGHTS} has inconsistent shapes: components "
                            f"{enc.components.shape}, buckets {enc.buckets.shape}, idf "
                            f"{enc.idf.shape}; expected ({len(enc.buckets)}, {enc.dim})")
    return enc


# ---------------------------------------------------------------------------------------
# Batch embedding


class _EmbedActor:
    """Ray Data actor: loads the encoder once, then embeds batches of (row, text)."""

    def __init__(self, encoder_dir: str):
        self.encoder = load_encoder(encoder_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.encoder.encode([str(t) for t in batch["text"]])
        return {"row": batch["row"], "embedding": emb}


def embed_texts(texts: Sequence[str], encoder_dir: str, *, on: str = "ray",
                batch_size: int = 512, actors: int = 2, cpus_per_actor: float = 1.0,
                gpus_per_actor: float = 0.0) -> np.ndarray:
    """Embed ``texts`` with the encoder saved at ``encoder_dir``; rows keep the input order.

    ``on="ray"`` streams the texts through Ray Data ``map_batches`` on a fixed actor pool
    (the caller has initialised Ray); ``on="local"`` runs in this process with a progress bar.
    """
    if on == "local":
        from tqdm.auto import tqdm

        enc = load_encoder(encoder_dir)
        parts = [enc.encode(texts[i:i + batch_size])
                 for i in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch",
                               disable=len(texts) <= batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, enc.dim), np.float32)

    import ray.data

    # Pre-split into blocks (one per batch) so every actor of the pool gets work, without a
    # repartition task competing with the actors for CPUs (which deadlocks 2-core machines).
    table = pa.table({"row": np.arange(len(texts), dtype=np.int64),
                      "text": pa.array(list(texts), pa.string())})
    blocks = [table.slice(i, batch_size) for i in range(0, len(texts), batch_size)] or [table]
    out = ray.data.from_arrow(blocks).map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"encoder_dir": encoder_dir},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    rows, embs = [], []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        e = batch["embedding"]
        embs.append(np.stack(e) if e.dtype == object else e)  # a fixed-size-list column arrives as a 1-D object array
    rows_a, emb = np.concatenate(rows), np.concatenate(embs).astype(np.float32)
    result = np.empty_like(emb)
    result[rows_a] = emb
    return result
