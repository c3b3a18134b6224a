"""reca's evaluation suite: attribute-binding prompt sets, a resumable GenEval-layout image runner,
scorers behind one small interface, reports with confidence intervals, and the ``reca-eval`` CLI.

Modules: ``prompts`` (prompt sets and loaders) → ``runner`` (images on disk + manifest) →
``scorers`` (image + prompt → checks) → ``report`` (accuracy, CIs, compare, understanding gap) →
``cli``. Nothing here imports a model library at import time.
"""
