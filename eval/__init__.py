"""reca's evaluation suite: attribute-binding prompt sets, a resumable GenEval-layout image runner,
scorers behind one small interface, reports with confidence intervals, and the ``reca-eval`` CLI.

Modules: ``prompts`` (prompt sets and loaders) → ``runner`` (images on disk + manifest) →
``scorers`` (image + prompt → checks) → ``stats`` (Wilson, bootstrap and t-intervals) → ``report``
(accuracy, CIs, compare, understanding gap) → ``cli``; the entropy probe: ``entropy`` (the maths) →
``probe`` (traces, curves, summaries). Nothing here imports a model library at import time (the
probe's ``entropy`` needs torch). The demo (top-level ``demo``) builds on this package, never the
other way round.
"""
