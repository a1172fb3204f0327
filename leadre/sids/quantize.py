"""Residual quantisers: an embedding becomes ``levels`` codes, each from a codebook of ``K``.

- ``RqKMeans``: residual k-means. Level l clusters what levels < l left unexplained.
- ``RqVae``: RQ-VAE (Zeghidour et al. 2021; TIGER, LEADRE): an MLP encoder maps the
  embedding to a small latent, residual vector quantisation with trained codebooks, an MLP
  decoder reconstructs the embedding. Loss = reconstruction + sum over levels of codebook
  loss ||sg(r) - e||^2 + beta * commitment ||r - sg(e)||^2, straight-through gradients.
  Codebooks start from residual k-means on the initial latents, and codes unused for an epoch
  are re-seeded with current residuals, the usual guard against codebook collapse.

Both are deterministic for a seed (own torch/numpy generators, no global RNG state read) and
save to / load from one safetensors file (``codebooks.safetensors``).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from torch import nn

from leadre.artifacts import ArtifactError, read_bytes, write_text

log = logging.getLogger(__name__)

CODEBOOKS_FILE = "codebooks.safetensors"
# k-means++ seeding is O(n*K*d) sequential work: seed on a sample, then run Lloyd on all.
KMEANS_PP_SAMPLE = 20_000
# Rows per distance block: bounds memory of the (rows x K) distance matrix.
ASSIGN_BLOCK = 65_536
# RQ-VAE codebooks are initialised by residual k-means on the latents of this many points.
INIT_SAMPLE = 100_000
# Dead-code reset draws replacement vectors from this many random training points per epoch.
RESET_SAMPLE = 4_096
# No resets in the final share of epochs, so the codebooks the codes come from are trained.
RESET_STOP_FRACTION = 0.9


@contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` torch intra-op threads (restored after). Measured on the 2-core box with
    other jobs running (load ~9): 20 RQ-VAE epochs on Scientific took 8 s on 1 thread and 62 s
    on 2 (OpenMP workers spin-wait for a descheduled peer). On an idle machine 2 threads are
    about 2x faster; set ``cpu_threads: null`` there."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def assign(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of ``x``; ties -> lowest."""
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    c2 = (codebook * codebook).sum(1)
    for s in range(0, len(x), ASSIGN_BLOCK):
        xb = x[s:s + ASSIGN_BLOCK]
        out[s:s + ASSIGN_BLOCK] = (c2[None, :] - 2.0 * xb @ codebook.T).argmin(1)
    return out


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    first = torch.randint(len(x), (1,), generator=gen, device="cpu").item()
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: duplicates are harmless, never chosen
            idx = torch.randint(len(x), (1,), generator=gen, device="cpu").item()
        else:
            idx = torch.multinomial((d2 / total).cpu(), 1, generator=gen).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """(k, d) centroids: k-means++ seeding on a sample, Lloyd iterations on all rows; an
    emptied cluster is re-seeded with the point currently worst served."""
    sample = x
    if len(x) > KMEANS_PP_SAMPLE:
        pick = torch.randperm(len(x), generator=gen, device="cpu")[:KMEANS_PP_SAMPLE]
        sample = x[pick.to(x.device)]
    centers = _kmeans_pp(sample, k, gen)
    for _ in range(iters):
        idx = assign(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k)
        moved = sums / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            if len(x) > k:
                err = ((x - centers[idx]) ** 2).sum(1)
                moved[empty] = x[err.topk(len(empty)).indices]
            else:  # fewer points than codes: unused codes keep their (duplicate) seed
                moved[empty] = centers[empty]
        if torch.equal(moved, centers):
            break
        centers = moved
    return centers


def residual_kmeans(x: torch.Tensor, levels: int, k: int, iters: int, gen: torch.Generator
                    ) -> list[torch.Tensor]:
    books, r = [], x
    for level in range(levels):
        c = kmeans(r, k, iters, gen)
        books.append(c)
        r = r - c[assign(r, c)]
        log.info("rq-kmeans level %d: residual mse %.5f", level, float((r * r).sum(1).mean()))
    return books


class Quantizer(ABC):
    """Maps (n, dim) float32 embeddings to (n, levels) int64 codes."""

    kind: str

    def __init__(self, levels: int, codebook_size: int, seed: int = 0, device: str = "auto",
                 threads: int | None = 1):
        self.levels, self.codebook_size, self.seed = levels, codebook_size, seed
        self.device = pick_device(device)
        # CPU threads while fitting (None: torch's default). Results depend on it only
        # through float summation order, so keep it fixed for bit-identical S-IDs.
        self.threads = threads if self.device.type == "cpu" else None

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size] * self.levels

    @abstractmethod
    def fit(self, x: np.ndarray) -> "Quantizer": ...

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to encode again; ``codebooks`` is (levels, K, d)."""

    @abstractmethod
    def settings(self) -> dict: ...

    def codebooks(self) -> np.ndarray:
        return self.tensors()["codebooks"].cpu().numpy()

    @abstractmethod
    def _last_residual(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes of the first ``levels - 1`` levels (n, L-1), the residual entering the last
        level (n, d)), both as :meth:`encode` computes them."""

    @torch.no_grad()
    def rank_last_level(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, ranked)``: :meth:`encode`'s codes (n, L) and, per row, every code of the
        last level nearest first (n, K); ``ranked[:, 0] == codes[:, -1]``. Adding an ad after
        training uses it: when the S-ID group of its codes is full, the next-best last-level
        code is the nearest code tuple to try (:func:`leadre.sids.extend.assign_sids`)."""
        prefix, r = self._last_residual(x)
        book = self.tensors()["codebooks"][-1].to(r.device)
        d = (book * book).sum(1)[None, :] - 2.0 * r @ book.T  # as ``assign`` ranks them
        ranked = torch.argsort(d, dim=1, stable=True)
        codes = torch.cat([prefix, ranked[:, :1]], 1)
        return codes.cpu().numpy(), ranked.cpu().numpy()

    def fingerprint(self) -> bytes:
        """Canonical bytes of kind, settings and tensors, for version hashing. (The
        safetensors file itself is not byte-stable: its header order varies run to run.)"""
        parts = [json.dumps({"kind": self.kind, **self.settings()}, sort_keys=True).encode()]
        for name, t in sorted(self.tensors().items()):
            parts += [name.encode(), t.detach().cpu().contiguous().numpy().tobytes()]
        return b"\0".join(parts)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {"kind": self.kind, "settings": json.dumps(self.settings())}
        return save({k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}, meta)

    def save(self, location: str) -> str:
        return write_text(location, CODEBOOKS_FILE, self.to_bytes())


class RqKMeans(Quantizer):
    kind = "rqkmeans"

    def __init__(self, levels: int, codebook_size: int, seed: int = 0, device: str = "auto",
                 kmeans_iters: int = 30, threads: int | None = 1):
        super().__init__(levels, codebook_size, seed, device, threads)
        self.kmeans_iters = kmeans_iters
        self.books: torch.Tensor | None = None

    def fit(self, x: np.ndarray) -> "RqKMeans":
        gen = torch.Generator().manual_seed(self.seed)
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        with cpu_threads(self.threads):
            self.books = torch.stack(residual_kmeans(xt, self.levels, self.codebook_size,
                                                     self.kmeans_iters, gen))
        return self

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        r = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        codes = []
        for book in self.books:
            idx = assign(r, book)
            codes.append(idx)
            r = r - book[idx]
        return torch.stack(codes, 1).cpu().numpy()

    def _last_residual(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        codes = []
        for book in self.books[:-1]:
            idx = assign(r, book)
            codes.append(idx)
            r = r - book[idx]
        return torch.stack(codes, 1) if codes else r.new_zeros((len(r), 0), dtype=torch.long), r

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.books}

    def settings(self) -> dict:
        return {"levels": self.levels, "codebook_size": self.codebook_size,
                "dim": int(self.books.shape[-1]), "seed": self.seed}


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RqVaeModel(nn.Module):
    """Encoder MLP -> residual VQ over ``levels`` codebooks -> decoder MLP."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], latent_dim: int, levels: int,
                 codebook_size: int):
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), in_dim])
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, latent_dim))

    def quantize(self, z: torch.Tensor):
        """codes (n, L), straight-through quantised latent, codebook + commitment losses,
        and the residual entering each level (for dead-code reset)."""
        r, zq = z, torch.zeros_like(z)
        codes, residuals = [], []
        codebook_loss = commit_loss = z.new_zeros(())
        for book in self.codebooks:
            idx = assign(r.detach(), book.detach())
            e = book[idx]
            residuals.append(r.detach())
            codebook_loss = codebook_loss + ((r.detach() - e) ** 2).sum(1).mean()
            commit_loss = commit_loss + ((r - e.detach()) ** 2).sum(1).mean()
            zq = zq + e
            r = r - e.detach()
            codes.append(idx)
        zq = z + (zq - z).detach()  # straight-through estimator
        return torch.stack(codes, 1), zq, codebook_loss, commit_loss, residuals

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        codes, zq, cb, commit, residuals = self.quantize(z)
        recon = ((self.decoder(zq) - x) ** 2).sum(1).mean()
        return codes, recon, cb, commit, residuals


class RqVae(Quantizer):
    kind = "rqvae"

    def __init__(self, levels: int, codebook_size: int, seed: int = 0, device: str = "auto", *,
                 in_dim: int | None = None, hidden_dims: Sequence[int] = (256, 128),
                 latent_dim: int = 32, epochs: int = 200, batch_size: int = 1024,
                 lr: float = 1e-3, beta: float = 0.25, kmeans_iters: int = 30,
                 dead_code_reset: bool = True, threads: int | None = 1):
        super().__init__(levels, codebook_size, seed, device, threads)
        self.in_dim, self.hidden_dims, self.latent_dim = in_dim, list(hidden_dims), latent_dim
        self.epochs, self.batch_size, self.lr, self.beta = epochs, batch_size, lr, beta
        self.kmeans_iters, self.dead_code_reset = kmeans_iters, dead_code_reset
        self.model: RqVaeModel | None = None
        self.history: list[dict] = []
        if in_dim is not None:
            self._build(in_dim)

    def _build(self, in_dim: int) -> None:
        self.in_dim = in_dim
        # Parameter init reads the global generator: seed it without leaking into the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = RqVaeModel(in_dim, self.hidden_dims, self.latent_dim, self.levels,
                                    self.codebook_size).to(self.device)

    def fit(self, x: np.ndarray) -> "RqVae":
        with cpu_threads(self.threads):
            return self._fit(x)

    def _fit(self, x: np.ndarray) -> "RqVae":
        from tqdm.auto import trange

        gen = torch.Generator().manual_seed(self.seed)
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        self._build(xt.shape[1])
        model = self.model
        with torch.no_grad():  # codebooks start at residual k-means of the initial latents
            z = model.encoder(xt[torch.randperm(len(xt), generator=gen)[:INIT_SAMPLE]
                                 .to(self.device)])
            model.codebooks.copy_(torch.stack(
                residual_kmeans(z, self.levels, self.codebook_size, self.kmeans_iters, gen)))
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        n = len(xt)
        bar = trange(self.epochs, desc="rq-vae", unit="epoch", disable=None)
        for epoch in bar:
            model.train()
            usage = torch.zeros(self.levels, self.codebook_size, device=self.device)
            totals = np.zeros(3)
            perm = torch.randperm(n, generator=gen).to(self.device)
            for s in range(0, n, self.batch_size):
                batch = xt[perm[s:s + self.batch_size]]
                codes, recon, cb, commit, _ = model(batch)
                loss = recon + cb + self.beta * commit
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for lvl in range(self.levels):
                    usage[lvl] += torch.bincount(codes[:, lvl], minlength=self.codebook_size)
                totals += [recon.item() * len(batch), cb.item() * len(batch),
                           commit.item() * len(batch)]
            dead = int((usage == 0).sum())
            if (self.dead_code_reset and dead
                    and epoch < int(self.epochs * RESET_STOP_FRACTION)):
                self._reset_dead(xt, usage, gen)
            rec = {"epoch": epoch, "recon": totals[0] / n, "codebook": totals[1] / n,
                   "commit": totals[2] / n, "dead_codes": dead}
            self.history.append(rec)
            bar.set_postfix(recon=f"{rec['recon']:.4f}", dead=dead)
        return self

    @torch.no_grad()
    def _reset_dead(self, xt: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> None:
        """Re-seed each unused code with the residual (at its level) of a random point."""
        model = self.model
        sample = xt[torch.randperm(len(xt), generator=gen)[:RESET_SAMPLE].to(self.device)]
        _, _, _, _, residuals = model.quantize(model.encoder(sample))
        for lvl in range(self.levels):
            dead = (usage[lvl] == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(len(sample), (len(dead),), generator=gen).to(self.device)
                model.codebooks[lvl, dead] = residuals[lvl][pick]

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        out = [self.model.quantize(self.model.encoder(xt[s:s + ASSIGN_BLOCK]))[0]
               for s in range(0, len(xt), ASSIGN_BLOCK)]
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.levels), np.int64)

    def _last_residual(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        r = self.model.encoder(torch.as_tensor(x, dtype=torch.float32, device=self.device))
        codes = []
        for book in self.model.codebooks[:-1]:
            idx = assign(r, book)
            codes.append(idx)
            r = r - book[idx]
        return torch.stack(codes, 1) if codes else r.new_zeros((len(r), 0), dtype=torch.long), r

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.model.codebooks.data,
                **{f"model.{k}": v for k, v in self.model.state_dict().items() if k != "codebooks"}}

    def settings(self) -> dict:
        return {"levels": self.levels, "codebook_size": self.codebook_size, "seed": self.seed,
                "in_dim": self.in_dim, "hidden_dims": self.hidden_dims,
                "latent_dim": self.latent_dim}


def load_quantizer(location: str, device: str = "auto") -> Quantizer:
    """Restore a quantiser from ``<location>/codebooks.safetensors``; a missing, truncated or
    inconsistent file raises ``ArtifactError`` naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    target = f"{location}/{CODEBOOKS_FILE}"
    raw = read_bytes(location, CODEBOOKS_FILE)
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
        kind, settings = meta["kind"], json.loads(meta["settings"])
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{target} is corrupt (not a leadre codebook file): {e}") from None
    books = tensors.get("codebooks")
    if books is None or books.ndim != 3 or tuple(books.shape[:2]) != (
            settings.get("levels"), settings.get("codebook_size")):
        raise ArtifactError(f"{target}: codebooks tensor missing or of shape "
                            f"{None if books is None else tuple(books.shape)}, expected "
                            f"({settings.get('levels')}, {settings.get('codebook_size')}, d)")
    if kind == "rqkmeans":
        q = RqKMeans(settings["levels"], settings["codebook_size"], settings["seed"], device)
        q.books = books.to(q.device)
        return q
    if kind == "rqvae":
        q = RqVae(settings["levels"], settings["codebook_size"], settings["seed"], device,
                  in_dim=settings["in_dim"], hidden_dims=settings["hidden_dims"],
                  latent_dim=settings["latent_dim"])
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        state["codebooks"] = books
        try:
            q.model.load_state_dict(state)
        except RuntimeError as e:
            raise ArtifactError(f"{target}: weights do not match the recorded settings: {e}"
                                ) from None
        return q
    raise ArtifactError(f"{target}: unknown quantizer kind {kind!r}")
