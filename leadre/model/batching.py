"""Batching for the constrained decoder (:mod:`leadre.model.decode`) that makes larger
batches pay on a CPU, where moving the beam-expanded KV cache around costs more than the
model's arithmetic:

* :func:`length_buckets`: prompts of similar token length decode together, and a batch ends
  before its padding or its cache grows too large;
* :func:`reserve`: the KV cache gets room for the S-ID tokens up front, so each decoding step
  writes its token in place instead of concatenating (copying) the whole cache;
* :func:`reorder_generated`: when beams move among the beams of their own prompt, only the
  generated positions are gathered, not the prompt's (identical) keys and values.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def reserve(cache: Any, extra: int) -> Any:
    """``cache`` with room for ``extra`` more positions per layer: HF's DynamicCache appends by
    concatenating, copying the whole (beam-expanded) cache at every decoding step, which is
    most of the time of a large batch on a CPU. Caches of another layout are left alone."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return cache

    class ReservedLayer(DynamicLayer):
        """Keys/values are views of buffers with spare positions; appending writes in place."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self._kbuf = _append(self.keys, getattr(self, "_kbuf", None), key_states)
            self.values, self._vbuf = _append(self.values, getattr(self, "_vbuf", None),
                                              value_states)
            return self.keys, self.values

        def reorder_cache(self, beam_idx):
            if getattr(self, "_kbuf", None) is None or self.get_seq_length() == 0:
                return super().reorder_cache(beam_idx)
            n = self.keys.shape[-2]
            self._kbuf = self._kbuf.index_select(0, beam_idx.to(self._kbuf.device))
            self._vbuf = self._vbuf.index_select(0, beam_idx.to(self._vbuf.device))
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def _append(view, buf, new):
        n = view.shape[-2] if view.dim() == 4 else 0
        m = new.shape[-2]
        if buf is None or buf.shape[0] != new.shape[0] or n + m > buf.shape[-2]:
            buf = new.new_empty((new.shape[0], new.shape[1], n + m + extra, new.shape[3]))
            if n:
                buf[:, :, :n] = view
        buf[:, :, n:n + m] = new
        return buf[:, :, :n + m], buf

    layers = getattr(cache, "layers", None)
    if layers and all(type(x) is DynamicLayer for x in layers):
        for layer in layers:
            layer.__class__ = ReservedLayer
    return cache


def reorder_generated(cache: Any, parent: torch.Tensor, prompt_len: int) -> None:
    """``cache.reorder_cache(parent)`` for beams that only move among the beams of their own
    prompt, as many as before: every beam of a prompt holds the same copy of that prompt's keys/values, so only
    the positions generated so far need gathering (the full gather copies the whole cache,
    prompt included, at every step: most of the time of a large batch on a CPU)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(x, "keys", None) is not None and
                             x.keys.shape[0] == len(parent) for x in layers):
        cache.reorder_cache(parent)  # the beam count changed (or an unknown cache): in full
        return
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if t is None or t.shape[-2] <= prompt_len:
                continue
            t[:, :, prompt_len:] = t[:, :, prompt_len:].index_select(0, parent.to(t.device))


def length_buckets(sorted_lengths: Sequence[int], batch_size: int, slack: float | None,
                   max_tokens: int = 0, beams: int = 1) -> list[np.ndarray]:
    """Consecutive positions of ascending ``sorted_lengths``, at most ``batch_size`` each; with
    ``slack``, a batch also ends before the prompt that would make its padded size exceed
    ``(1 + slack)`` times its real tokens; with ``max_tokens``, before the one that would make
    ``prompts x beams x longest`` exceed it."""
    out, start, total = [], 0, 0
    for i, length in enumerate(sorted_lengths):
        count = i - start
        padded = (count + 1) * length
        if count and (count >= batch_size or
                      (slack is not None and padded > (1 + slack) * (total + length)) or
                      (max_tokens and padded * beams > max_tokens)):
            out.append(np.arange(start, i))
            start, total = i, 0
        total += int(length)
    if len(sorted_lengths):
        out.append(np.arange(start, len(sorted_lengths)))
    return out
