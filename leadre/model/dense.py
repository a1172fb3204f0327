"""The dense head: the generator's second way to retrieve (after LIGER, 2024).

Beside the S-ID tokens, the fine-tuned LM also predicts the next ad's vector in the frozen
encoder's space (the vectors ``leadre sids`` wrote): a linear map of the backbone's last hidden
state at the last prompt token, the state the first S-ID token is decoded from, scaled to
unit length. It trains jointly with the S-ID loss as a softmax over the catalog's ads
(``full``) or over the batch's targets (``in_batch``) of ``cos(u, v) / temperature``, the
temperature learnt, each target softened over the answer's neighbours in the frozen space.

At inference the trie beam's top B and the dense head's top M over the active ads are fused
(:func:`fuse`) log-linearly, ``(1 - w) log p_beam(ad) + w log p_dense(ad)``: ``p_beam`` is the
S-ID's probability under the LM (an ad off the beam gets the beam's lowest), ``p_dense`` the
head's softmax over every active ad. An ad the model never trained on (held out as cold, or
added to the catalog after training: not in ``trained_ads``) has no meaningful ``p_beam``,
since the LM never learnt to emit it; it gets the LM log-probability an ad of its dense score
has, ``a log p_dense + b`` (fitted on the beam's candidates of validation users, then shifted
by the offset :func:`tune_fusion` picks with stand-ins: trained ads the head never saw, scored
as if unseen), so it competes the day it exists.

Saved with the model as ``<stage dir>/dense/``: ``head.safetensors``; ``head.json`` (the
encoder version of the vectors it was trained against, its learnt temperature, the tuned
fusion); ``trained_ads.json`` (the ads the model trained on, and the stand-ins).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from leadre.artifacts import ArtifactError

log = logging.getLogger(__name__)

DENSE_DIR, WEIGHTS_FILE, META_FILE = "dense", "head.safetensors", "head.json"
TRAINED_ADS_FILE = "trained_ads.json"  # the ads the model trained on, and the stand-ins
# The attribute the head lives under while it trains: a submodule of the LM, so DDP
# synchronises its gradients with the rest, but never saved in the LM's own weights.
ATTRIBUTE = "leadre_dense"
# Dense weights tried on the validation users (0 = the beam's order for the ads the model
# learnt, 1 = the dense head's alone), and offsets of the unseen ads' imputed LM side.
FUSION_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
OFFSET_GRID = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass
class DenseMeta:
    """What ``head.json`` records next to the weights."""

    encoder_version: str | None
    sid_version: str | None
    hidden_size: int
    dim: int
    temperature: float
    fusion_weight: float = 0.0
    # log p_beam ~ a * log p_dense + b over the beam's candidates on validation users: the LM
    # side imputed to an ad the model never trained on
    unseen_calibration: tuple[float, float] | None = None
    fusion_tuned_on: dict[str, Any] | None = None


class DenseHead(nn.Module):
    """hidden state -> unit vector in the encoder's space, and the softmax's inverse
    temperature, learnt from ``1 / temperature`` (CLIP's logit scale: the frozen ads' vectors
    sit close together, so a fixed temperature leaves the head's distribution flat). Bare
    parameters, not an ``nn.Linear``: PEFT's ``all-linear`` LoRA must not wrap them."""

    MAX_SCALE = 100.0

    def __init__(self, hidden_size: int, dim: int, seed: int = 0, temperature: float = 0.05):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, hidden_size, generator=gen)
                                   * hidden_size ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.linear(hidden, self.weight.to(hidden.dtype)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.MAX_SCALE)

    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())


def backbone(model: Any) -> nn.Module:
    """The decoder stack whose ``last_hidden_state`` feeds the LM head (PEFT unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


class HiddenCapture:
    """Keeps the backbone's ``last_hidden_state`` (a forward hook): TRL's fused LM head and
    ``logits_to_keep`` decoding both drop it from the model's outputs. ``keep="last"``
    (training: one forward per loss) or ``"first"`` until popped (decoding: the prompt's
    pass, not the S-ID steps after it)."""

    def __init__(self, model: Any, keep: str = "last"):
        self.hidden: torch.Tensor | None = None
        self.keep_first = keep == "first"
        self._handle = backbone(model).register_forward_hook(self._keep)

    def _keep(self, _module, _args, output) -> None:
        if self.keep_first and self.hidden is not None:
            return
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") \
            else output[0]

    def pop(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("no hidden state captured: the backbone did not run")
        return hidden

    def close(self) -> None:
        self._handle.remove()


def attach(model: Any, head: DenseHead) -> None:
    """Make ``head`` a submodule of ``model`` for training, kept out of its saved weights."""
    model.add_module(ATTRIBUTE, head)
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    model._keys_to_ignore_on_save = ignore | {f"{ATTRIBUTE}.{n}" for n, _ in head.named_parameters()}


def sid_keys(token_ids: np.ndarray) -> dict[tuple[int, ...], int]:
    """S-ID token-id tuple -> catalog index, for the catalog rows ``token_ids`` (n, depth)."""
    return {tuple(map(int, t)): i for i, t in enumerate(token_ids)}


def targets_of(labels: torch.Tensor, keys: dict[tuple[int, ...], int], depth: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of the last prompt token, catalog index of the answered ad) per row of a
    batch whose ``labels`` mark the completion (-100 elsewhere); index -1 where the answer
    is not the S-ID of a catalog ad (an auxiliary task that answers with text)."""
    labelled = labels != -100
    first = labelled.float().argmax(dim=1)
    last_prompt = (first - 1).clamp(min=0)
    lab = labels.cpu().numpy()
    index = []
    for r, f in enumerate(first.tolist()):
        answer = tuple(int(x) for x in lab[r, f:f + depth])
        index.append(keys.get(answer, -1) if labelled[r].any() else -1)
    return last_prompt, torch.tensor(index, dtype=torch.long, device=labels.device)


def dense_loss(head: DenseHead, hidden: torch.Tensor, last_prompt: torch.Tensor,
               index: torch.Tensor, catalog: torch.Tensor, negatives: str = "full",
               soft_targets: float = 0.0) -> tuple[torch.Tensor, float]:
    """Softmax cross-entropy of each row's answered ad among ``catalog`` (unit vectors) or,
    ``in_batch``, among the batch's answered ads; returns (loss, top-1 accuracy).
    ``soft_targets`` > 0 spreads each target over the ads near the answer in the frozen
    space (``softmax(cos(answer, ad) / soft_targets)``), so the head learns the region of
    the next ad, which holds the ads it never saw, rather than one trained ad's point. Rows
    without a catalog answer are left out; a batch with none gives a zero that still
    touches the head (DDP expects a gradient for every trained parameter)."""
    keep = index >= 0
    if not keep.any():
        return (head.weight.sum() + head.log_scale) * 0.0, 0.0
    rows = torch.nonzero(keep).squeeze(1)
    user = head(hidden[rows, last_prompt[rows]])
    target = index[rows]
    if negatives == "in_batch":
        ads, target = torch.unique(target, return_inverse=True)
        bank = catalog[ads]
    else:
        bank = catalog
    logits = (user @ bank.to(user.dtype).T).float() * head.scale()
    if soft_targets > 0:
        bank = bank.to(logits.dtype)
        soft = torch.softmax(bank[target] @ bank.T / soft_targets, dim=-1)
        loss = -(soft * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    else:
        loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == target).float().mean().item()
    return loss, accuracy


def soft_target_temperature(vectors: np.ndarray, self_weight: float, sample: int = 512,
                            seed: int = 0) -> float:
    """The temperature at which an answer keeps, on average over a sample of the catalog's
    ads, ``self_weight`` of its soft target ``softmax(cos(answer, ad) / t)``: the same share
    whether the catalog's vectors sit far apart or close together. 0 for one-hot targets
    (``self_weight`` 1)."""
    if self_weight >= 1.0:
        return 0.0
    pick = np.random.default_rng(seed).permutation(len(vectors))[:sample]
    sims = vectors[pick] @ vectors.T

    def kept(t: float) -> float:
        z = np.exp((sims - sims.max(axis=1, keepdims=True)) / t)
        return float((z.max(axis=1) / z.sum(axis=1)).mean())

    lo, hi = 1e-3, 1.0  # kept() falls as t rises
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if kept(mid) > self_weight else (lo, mid)
    return float((lo * hi) ** 0.5)


# --- saving and loading -------------------------------------------------------------------

def save(directory: str | Path, head: DenseHead, meta: DenseMeta) -> Path:
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "log_scale": head.log_scale.detach().float().cpu().reshape(1)},
              str(out / WEIGHTS_FILE))
    meta.temperature = head.temperature()  # the learnt one
    (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
    return out


def load_head(directory: str | Path) -> tuple[DenseHead, DenseMeta]:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = DenseMeta(**json.loads((directory / META_FILE).read_text()))
    head = DenseHead(meta.hidden_size, meta.dim)
    saved = load_file(str(directory / WEIGHTS_FILE))
    head.weight.data.copy_(saved["weight"])
    head.log_scale.data.copy_(saved["log_scale"].reshape(()))
    return head.eval(), meta


def save_trained_ads(directory: str | Path, ad_ids: Sequence[str],
                     holdout: Sequence[str] = ()) -> None:
    """Record the ads the model trained on and, among them, those kept out of the head's
    softmax (``holdout``: the stand-ins for unseen ads when the fusion is tuned)."""
    (Path(directory) / TRAINED_ADS_FILE).write_text(json.dumps(
        {"trained": sorted(map(str, ad_ids)), "dense_holdout": sorted(map(str, holdout))}))


def load_trained_ads(directory: str | Path, key: str = "trained") -> frozenset[str] | None:
    """The ads the model trained on (``key="dense_holdout"``: those kept out of the head's
    softmax); None when not recorded."""
    path = Path(directory) / TRAINED_ADS_FILE
    return frozenset(json.loads(path.read_text())[key]) if path.exists() else None


def find(model_dir: str | Path) -> Path | None:
    """``<model_dir>/dense`` when the model there was trained with a dense head."""
    d = Path(model_dir) / DENSE_DIR
    return d if (d / META_FILE).exists() else None


def set_fusion(directory: str | Path, weight: float, calibration: tuple[float, float],
               tuned_on: dict[str, Any]) -> None:
    path = Path(directory) / META_FILE
    meta = json.loads(path.read_text())
    meta.update(fusion_weight=float(weight), unseen_calibration=list(calibration),
                fusion_tuned_on=tuned_on)
    path.write_text(json.dumps(meta, indent=2))


def check_encoder(meta: DenseMeta, encoder_version: str | None, where: str, source: str) -> None:
    """Refuse a head trained against another encoder's vectors than the ones it will score
    (its cosine would compare two unrelated spaces)."""
    if meta.encoder_version and encoder_version and meta.encoder_version != encoder_version:
        raise ArtifactError(f"the dense head in {where} was trained on vectors of encoder "
                            f"{meta.encoder_version}, but {source} holds vectors of encoder "
                            f"{encoder_version}: retrain the model on this S-ID stage")


# --- fused ranking ------------------------------------------------------------------------

def dense_log_probs(users: np.ndarray, vectors: np.ndarray, active: np.ndarray,
                    temperature: float) -> np.ndarray:
    """log p_dense of every table row (inactive rows -inf): the head's softmax over the
    active ads, ``(prompts, rows)``. Exact (one matrix product), so the mixture weighs a
    calibrated distribution whichever index proposed the candidates."""
    logits = users @ vectors.T / temperature
    logits[:, ~active] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return logits - lse


def fuse(beam_rows: np.ndarray, beam_scores: np.ndarray, dense_rows: np.ndarray,
         dense_lp: np.ndarray, unseen: np.ndarray | None, weight: float, k: int,
         calibration: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fused top ``k`` per prompt. Candidates: the beam's rows and the dense head's rows (-1 =
    none); score ``(1 - weight) log p_beam + weight log p_dense`` (``dense_lp``:
    :func:`dense_log_probs`), where an ad off the beam takes the beam's lowest log-prob and an
    ``unseen`` row (the model never trained on it) takes ``a log p_dense + b``
    (``calibration``; default (1, 0)). Returns (rows, scores), -1 / -inf padded."""
    a, b = calibration if calibration is not None else (1.0, 0.0)
    n = len(beam_rows)
    rows = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    for i in range(n):
        beam = beam_rows[i][beam_rows[i] >= 0]
        lp = beam_scores[i][:len(beam)]
        extra = dense_rows[i][dense_rows[i] >= 0]
        cand = np.concatenate([beam, extra[~np.isin(extra, beam)]])
        if not len(cand):
            continue
        floor = float(lp.min()) if len(lp) else 0.0
        d = dense_lp[i, cand]
        from_beam = np.concatenate([lp, np.full(len(cand) - len(beam), floor, np.float32)])
        if unseen is not None:
            from_beam = np.where(unseen[cand], a * d + b, from_beam)
        total = (1.0 - weight) * from_beam + weight * d
        order = np.argsort(-total, kind="stable")[:k]
        rows[i, :len(order)] = cand[order]
        scores[i, :len(order)] = total[order]
    return rows, scores


def hits_at(rows: np.ndarray, targets: np.ndarray, k: int = 10) -> float:
    """Share of prompts whose target row is in their top ``k`` rows."""
    return float((rows[:, :k] == targets[:, None]).any(axis=1).mean()) if len(rows) else 0.0


def calibrate_unseen(beam_rows: np.ndarray, beam_scores: np.ndarray, dense_lp: np.ndarray
                     ) -> tuple[float, float]:
    """(a, b) of the least-squares line ``log p_beam ~ a log p_dense + b`` over every beam
    candidate of these prompts: the LM probability an ad of a given dense score has."""
    i, j = np.nonzero(beam_rows >= 0)
    x = dense_lp[i, beam_rows[i, j]]
    y = beam_scores[i, j]
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return 1.0, 0.0
    a, b = np.polyfit(x[ok], y[ok], 1)
    return float(a), float(b)


def tune_fusion(beam_rows: np.ndarray, beam_scores: np.ndarray, dense_rows: np.ndarray,
                dense_lp: np.ndarray, pseudo_unseen: np.ndarray, targets: np.ndarray,
                k: int = 10, tolerance: float = 0.02, grid: Sequence[float] = FUSION_GRID,
                offsets: Sequence[float] = OFFSET_GRID
                ) -> tuple[float, tuple[float, float], dict[str, Any]]:
    """Tune the fusion on validation rows: the line of :func:`calibrate_unseen`, then the
    weight of ``grid`` and the offset of ``offsets``, with the ``pseudo_unseen`` rows
    (trained ads kept out of the head's softmax) scored as if the model had never learnt
    them, the way unseen ads will be. Validation targets are never unseen ads (those arrive
    later), so this is how the rows price both what an unseen ad brings and the slots it
    takes. The operating point: of the settings whose HR@k is within ``tolerance`` (relative)
    of the best, the one that finds the most pseudo-unseen targets (new ads get the exposure
    the accuracy allows), then the higher HR@k. Returns (weight, calibration with the offset,
    the curves: HR@k by weight at the chosen offset, and HR@k / pseudo-unseen HR@k by offset
    at the chosen weight)."""
    a, b = calibrate_unseen(beam_rows, beam_scores, dense_lp)
    on_unseen = pseudo_unseen[np.maximum(targets, 0)] & (targets >= 0)
    hr, new = {}, {}
    for w in grid:
        for o in offsets:
            top = fuse(beam_rows, beam_scores, dense_rows, dense_lp, pseudo_unseen, w, k,
                       (a, b + o))[0]
            hr[(w, o)] = hits_at(top, targets, k)
            new[(w, o)] = hits_at(top[on_unseen], targets[on_unseen], k)
    best = max(hr.values())
    ok = [wo for wo in hr if hr[wo] >= best * (1 - tolerance)]
    w, o = max(ok, key=lambda wo: (new[wo], hr[wo], -wo[0], -wo[1]))
    curves = {"hr@10_by_weight": {str(x): hr[(x, o)] for x in grid},
              "hr@10_by_offset": {str(x): hr[(w, x)] for x in offsets},
              "unseen_hr@10_by_offset": {str(x): new[(w, x)] for x in offsets},
              "best_hr@10": best, "pseudo_unseen_targets": int(on_unseen.sum())}
    return float(w), (a, b + o), curves
