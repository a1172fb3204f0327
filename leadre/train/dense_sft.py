"""TRL's ``SFTTrainer`` that also trains the dense head (:mod:`leadre.model.dense`): the
S-ID loss plus ``dense_weight`` times the head's softmax loss over the catalog, from the same
forward pass. The head rides inside the LM as a submodule (DDP averages its gradients with
the rest) and is saved beside each checkpoint as ``dense/``, so the chosen checkpoint's head
is the one exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from trl import SFTTrainer

from leadre.model import dense


class DenseSFTTrainer(SFTTrainer):
    """``SFTTrainer`` + the dense head. ``dense_setup`` holds the catalog's unit vectors
    (``vectors``, n x d), their S-IDs as token ids (``token_ids``, n x depth), the head's
    :class:`~leadre.model.dense.DenseMeta` fields (``meta``), ``weight`` and ``negatives``."""

    def __init__(self, *args: Any, head: dense.DenseHead, dense_setup: dict[str, Any],
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head = head.requires_grad_(True)  # PEFT froze it with the base weights
        self.dense_meta = dense.DenseMeta(**dense_setup["meta"])
        self.dense_weight = float(dense_setup["weight"])
        self.dense_negatives = dense_setup["negatives"]
        self.dense_soft_targets = float(dense_setup["soft_targets"])
        token_ids = np.asarray(dense_setup["token_ids"])
        self._keys = dense.sid_keys(token_ids)
        self._depth = token_ids.shape[1]
        self._catalog = torch.from_numpy(np.asarray(dense_setup["vectors"], np.float32))
        self._capture = dense.HiddenCapture(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        hidden = self._capture.pop()
        if self._catalog.device != hidden.device:
            self._catalog = self._catalog.to(hidden.device)
        last_prompt, index = dense.targets_of(labels, self._keys, self._depth)
        term, top1 = dense.dense_loss(self.head, hidden, last_prompt, index, self._catalog,
                                      self.dense_negatives, self.dense_soft_targets)
        # TRL's token loss is already divided over the whole accumulated batch; this is a
        # per-micro-batch mean, so it is averaged over the accumulation steps like TRL's aux loss
        steps = self.current_gradient_accumulation_steps \
            if num_items_in_batch is not None and model.training else 1
        loss = loss + self.dense_weight * term / steps
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dense_loss"].append(float(term.detach()))
        self._metrics[mode]["dense_top1"].append(top1)
        self._metrics[mode]["dense_temperature"].append(self.head.temperature())
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            dense.save(Path(output_dir or self.args.output_dir) / dense.DENSE_DIR, self.head,
                       self.dense_meta)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = dense.find(resume_from_checkpoint)
        if saved is not None:
            head, _ = dense.load_head(saved)
            self.head.load_state_dict(head.state_dict())
