"""reca: Reconstruction Alignment (RecA) post-training for unified multimodal models.

Pipeline, one module each: config → data → encoders (frozen semantic encoder) → adapter (the UMM
protocol; models/ holds the public families) → objectives (+ flow maths) → trainer.
"""

__version__ = "0.1.0"
