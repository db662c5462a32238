"""Disaggregated pipelines: knowledge distillation from a teacher producer to student consumers.

- ``control``: ``PipelineControl``, the control-plane seam the programs talk to (refs only),
  and ``LocalControl``, its in-memory implementation (colocated mode, tests);
- ``client``: ``HttpControl``, the same seam over the coordinator's API;
- ``distill``: sample windows, the teacher's top-k logits, the KD loss (Hinton et al. 2015,
  arXiv:1503.02531), the student's training loop and held-out evaluation;
- ``producer`` / ``consumer``: ``produce()`` / ``consume()`` and the programs a worker runs
  for ``kind = "producer"`` / ``"consumer"`` jobs; ``attach``: the file the worker hands them.

The tensors themselves travel through a feature store (``trainfleet.features``).
"""
