"""The embedded demo: the yellow-broccoli failure reproduced in a small synthetic world, and what
RecA does to it — end to end on a laptop CPU (`python -m demo --out runs/demo`, or `make demo`).

The top layer of the project: it uses the library (``reca``) and the evaluation suite (``eval``);
neither imports it. Modules: ``world`` (renders and captions) → ``seeds`` (every seed rule) →
``scorer`` (pixels → shape and colour) → ``encoder`` (the frozen CLIP) → ``run`` (the stages and
the report); its UMM is ``config.yaml``, shipped as package data.
"""
