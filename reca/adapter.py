"""The one contract between reca and a unified multimodal model (UMM).

An adapter is a ``torch.nn.Module`` that also satisfies :class:`UMMAdapter`. reca never subclasses
or registers adapters: a YAML config names the class by import path (``model.adapter:
my_pkg.my_umm:MyAdapter``) and its typed settings under ``model.args``. Optional abilities are
Protocols of their own below (:class:`HasOwnEncoder`, :class:`Traceable`, :class:`AttachesEncoder`,
:class:`GradientCheckpointing`, :class:`Compilable`, :class:`BottleneckByDesign`); reca checks an
adapter against these Protocols themselves (:func:`missing_members`), never against a second list.

Conventions shared by every adapter:

* pixels are float tensors ``(B, 3, H, W)`` in ``[-1, 1]`` at the adapter's ``resolution``;
* ``semantic`` tokens are the frozen encoder's patch tokens ``(B, N, D)`` (never pooled);
* every method that takes a condition takes a :class:`Condition` — either text prompts, or
  semantic tokens plus one instruction per sample (RecA's reconstruction prompt).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, get_type_hints, runtime_checkable

import torch
from PIL import Image


@dataclass
class Condition:
    """What an image is generated from.

    Exactly one of ``texts`` or ``semantic`` is set. ``instructions`` accompanies ``semantic`` (one per
    sample; an empty string means "no instruction", see ``recon.instruction_dropout``).
    """

    texts: list[str] | None = None
    semantic: torch.Tensor | None = None
    instructions: list[str] | None = None

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.semantic is None):
            raise ValueError("Condition needs exactly one of texts= or semantic=")
        if self.semantic is not None:
            if self.semantic.ndim != 3:
                raise ValueError(f"Condition.semantic must be (B, N, D), got {tuple(self.semantic.shape)}")
            if self.instructions is None:
                self.instructions = [""] * self.semantic.shape[0]
            if len(self.instructions) != self.semantic.shape[0]:
                raise ValueError("Condition.instructions needs one entry per semantic sample")

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else self.semantic.shape[0]  # type: ignore[union-attr]


@runtime_checkable
class UMMAdapter(Protocol):
    """A unified multimodal model, as the trainer, the evaluation and the probe use it.

    Build/load: ``from_config(args)`` where ``args`` is an instance of the class attribute
    ``Config`` (a dataclass — its fields are the adapter's YAML keys under ``model.args``).
    """

    Config: ClassVar[type]
    #: peft ``target_modules`` used when the config leaves ``lora.target_modules`` empty.
    default_lora_targets: ClassVar[str | list[str]]
    #: parameter-name prefixes trained in full fine-tuning when ``train.trainable`` is empty.
    default_trainable: ClassVar[list[str]]
    #: side of the square images this model generates, in pixels.
    resolution: int

    @classmethod
    def from_config(cls, args: Any) -> "UMMAdapter": ...

    def generation_loss(self, images: torch.Tensor, cond: Condition, seeds: Sequence[int]) -> torch.Tensor:
        """The model's own generation loss for producing ``images`` from ``cond`` (scalar).

        All randomness (noise, timestep, condition dropout) comes from ``seeds[i]`` for sample ``i``,
        so results do not depend on how a batch is split across processes or micro-batches."""
        ...

    def understanding_loss(
        self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]
    ) -> torch.Tensor:
        """Cross-entropy of ``answers`` given the image tokens and a text prompt: token mean per sample,
        then mean over samples (scalar)."""
        ...

    def answer_logprob(self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Summed log-probability of each answer, ``(B,)``; used for VQA-style scoring (P(yes))."""
        ...

    def generate(
        self, cond: Condition, *, seeds: Sequence[int], guidance_scale: float, num_steps: int
    ) -> list[Image.Image]:
        """One image per condition entry; ``seeds[i]`` alone decides image ``i``'s noise."""
        ...

    def save_pretrained(self, path: str | Path) -> None:
        """Write the whole model so that ``from_config`` with the same args pointing here loads it."""
        ...


@runtime_checkable
class HasOwnEncoder(Protocol):
    """Optional: adapters whose own understanding encoder can serve as the frozen semantic encoder
    (``encoder.kind: umm``)."""

    def semantic_encoder(self, layer: int = -1, input_size: int = 0) -> Any:
        """A :class:`reca.encoders.FrozenEncoder` over the model's own understanding encoder."""
        ...


@runtime_checkable
class Traceable(Protocol):
    """Optional: per-layer hidden states for the pseudo-unification entropy probe (eval/probe.py)."""

    def hidden_states(
        self, cond: Condition, answers: Sequence[str] | None = None
    ) -> list[tuple[list[torch.Tensor], int]]:
        """Per sample: hidden states ``(T, d)`` of every layer (embeddings first) over [prompt ;
        response], and the prompt length. Response = the answer's tokens when ``answers`` is given
        (text generation), else the positions that carry the generated image."""
        ...


@runtime_checkable
class AttachesEncoder(Protocol):
    """Optional: adapters that use the frozen encoder themselves (e.g. its text tower for text
    prompts); reca hands it over after building."""

    def attach_encoder(self, encoder: Any) -> None: ...


@runtime_checkable
class GradientCheckpointing(Protocol):
    """Optional: ``train.gradient_checkpointing`` — recompute activations in backward."""

    def enable_gradient_checkpointing(self) -> None: ...


@runtime_checkable
class Compilable(Protocol):
    """Optional: ``train.compile`` — ``torch.compile`` the adapter's heavy modules."""

    def compile_modules(self) -> None: ...


@runtime_checkable
class BottleneckByDesign(Protocol):
    """Optional: adapters whose condition and target never share a representation (SigLIP in, VQ
    tokens out) say why, and the trainer prints it instead of its copy-collapse warning."""

    bottleneck_by_design: str


def protocol_members(protocol: type, *, of_instances: bool = True) -> list[str]:
    """The attributes and methods a Protocol declares, in declaration order. With
    ``of_instances=False``, only what a *class* must already have: instance attributes such as
    ``resolution`` (annotated without ``ClassVar``) are set in ``__init__`` and are left out."""
    hints = get_type_hints(protocol, include_extras=True)
    names = [n for n, tp in hints.items() if of_instances or typing.get_origin(tp) is ClassVar]
    names += [n for n, v in vars(protocol).items() if isinstance(v, classmethod) or callable(v)]
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def missing_members(obj: Any, protocol: type) -> list[str]:
    """Members of ``protocol`` that ``obj`` lacks; ``obj`` is an adapter class or an instance."""
    return [m for m in protocol_members(protocol, of_instances=not isinstance(obj, type)) if not hasattr(obj, m)]
