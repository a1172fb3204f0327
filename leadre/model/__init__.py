"""The model layer, below training, evaluation and serving: everything that builds, loads or
runs the LM, written once.

* ``factory``: presets, the tokenizer (trained from scratch or a checkpoint's, S-ID tokens
  added), prompt rendering (chat template), building a model and loading a trained one;
* ``config``: :class:`~leadre.model.config.GenerationConfig`, the decoding settings and the
  pool of model copies, nested in every stage config that decodes;
* ``decode`` + ``batching``: the trie-constrained beam search and its batching, used by the
  training selection metric, ``eval``, ``warm`` and the serving generator.

Nothing here imports a stage: the layer sits after ``prompts`` and before ``train`` in
:data:`leadre.stages.LAYERS`.
"""
