"""Scorers: one image + its :class:`~eval.prompts.Prompt` → a dict of checks with ``correct``.

Every scorer satisfies :class:`Scorer` (a ``name`` and ``score(image, prompt)``); reports never
look further. Field conventions in the returned dict: ``correct`` (bool, required); per include
item ``i``: ``obj{i}_present``/``obj{i}_p_present``, ``obj{i}_color_ok``/``obj{i}_p_color``/
``obj{i}_color`` (predicted name), ``obj{i}_p_yes``...; ``unverified`` (bool) when the prompt asks
for something the scorer cannot check (count > 1, position, exclude, an unknown attribute) — then
``correct`` covers only what was checked, and reports count such images per category.

Implemented here:

* :class:`ClipScorer` — GenEval's colour protocol with CLIP zero-shot. GenEval crops each object
  with a Mask2Former detector and pastes it on #999 gray; we have no detector, so colour is decided
  on the whole image (or, with ``mask_background=True``, on the pixels :func:`foreground_mask`
  separates from a flat background, pasted on #999 like GenEval). Object presence is zero-shot over
  the prompt's object against GenEval's other class names, not detection; counting and position are
  not verified.
* :class:`VQAScorer` — the UMM's own understanding as judge: P(yes) from ``answer_logprob``.
* :class:`HFVQAScorer` — a transformers BLIP VQA model as judge (T2I-CompBench's BLIP-VQA; DPG-Bench's
  yes/no questions with any such model). Both VQA scorers share :func:`vqa_checks`: the questions
  (:func:`questions_for`, or a DPG-Bench prompt's own with its dependency rule) and the verdict.
* :class:`PaletteScorer` — model-free: majority nearest palette colour of foreground pixels, for
  synthetic worlds with flat colours (the demo world, tests).
* :func:`load_scorer` — any ``"package.module:Factory"`` (users' own scorers, the demo's).

The maths (template averaging, zero-shot probabilities, argmax with fixed tie-breaking, palette
votes, the foreground mask, P(yes)) are pure functions so they are tested on hand-made inputs.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from eval.dpg import dpg_questions, image_scores
from eval.prompts import COLORS, EvalError, Prompt, attribute_of, load_object_names

Score = dict[str, float | bool | str]

#: GenEval's colour templates (from its evaluate_images.py).
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {obj}",
    "a photo of a {c}-colored {obj}",
    "a photo of a {c} object",
)
OBJECT_TEMPLATE = "a photo of a {obj}"
ATTRIBUTE_TEMPLATE = "a photo of a {a} {obj}"
#: closed vocabularies for zero-shot attribute checks (T2I-CompBench's shape/texture words + ours).
ATTRIBUTE_VOCABS: dict[str, tuple[str, ...]] = {
    "shape": (
        "round",
        "circular",
        "square",
        "rectangular",
        "triangular",
        "oval",
        "oblong",
        "spherical",
        "cubic",
        "cylindrical",
        "conical",
        "pyramidal",
        "pentagonal",
        "teardrop",
        "diamond",
        "crescent",
        "star-shaped",
    ),
    "texture": ("metallic", "wooden", "glass", "plastic", "rubber", "leather", "fabric", "fluffy", "furry"),
    "size": ("small", "big", "tall", "short", "long"),
}
#: reference RGB of GenEval's ten colours, for flat-colour synthetic images (PaletteScorer).
GENEVAL_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 25),
    "green": (40, 160, 40),
    "blue": (30, 60, 230),
    "purple": (130, 40, 160),
    "pink": (255, 150, 200),
    "brown": (120, 70, 30),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
GENEVAL_GRAY = (153, 153, 153)  # "#999": the background GenEval pastes object crops on


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, image: Image.Image, prompt: Prompt) -> Score:
        """Checks of ``image`` against ``prompt``; at least ``correct: bool``."""
        ...


# --------------------------------------------------------------------------- pure maths


def average_template_embeddings(embeddings: Any) -> Any:
    """(K classes, T templates, D) text embeddings → (K, D): L2-normalise each template embedding,
    average over templates, renormalise (CLIP's zero-shot ensembling, as GenEval does it)."""
    e = embeddings / embeddings.norm(dim=-1, keepdim=True)
    mean = e.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def zero_shot_logits(image_embedding: Any, class_embeddings: Any, scale: float = 100.0) -> Any:
    """Scaled cosine similarities (K,) of one image embedding (D,) to K class embeddings (K, D)."""
    img = image_embedding / image_embedding.norm()
    cls = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
    return scale * (cls @ img)


def argmax_label(logits: Sequence[float], labels: Sequence[str]) -> str:
    """The label of the highest logit; ties go to the earliest label (GenEval's colour order), so the
    answer never depends on float noise in an unordered container."""
    if len(logits) != len(labels) or not labels:
        raise ValueError(f"argmax_label: {len(logits)} logits for {len(labels)} labels")
    values = [float(v) for v in logits]
    return labels[values.index(max(values))]


def softmax(logits: Sequence[float]) -> list[float]:
    values = [float(v) for v in logits]
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def p_yes_from_logprobs(logprob_yes: float, logprob_no: float) -> float:
    """P(yes) renormalised over {yes, no}: softmax of the two answers' log-probabilities."""
    return 1.0 / (1.0 + math.exp(float(logprob_no) - float(logprob_yes)))


def _rgb01(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def foreground_mask(image: Image.Image, threshold: float = 0.15) -> np.ndarray:
    """(H, W) bool: pixels that differ from a flat background.

    The background colour is the per-channel median of the one-pixel border (an object rarely fills
    the border); a pixel is foreground when its RGB distance to it (in [0, 1] units) exceeds
    ``threshold``. Meant for synthetic or studio-like images; photographs need a detector."""
    rgb = _rgb01(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(rgb - background, axis=-1) > threshold


def palette_votes(
    image: Image.Image, palette: Mapping[str, Sequence[int]], mask: np.ndarray | None = None
) -> dict[str, float]:
    """Share of (masked) pixels whose nearest palette colour (RGB Euclidean) is each name."""
    if not palette:
        raise ValueError("palette_votes: empty palette")
    names = list(palette)
    rgb = _rgb01(image).reshape(-1, 3)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape[0] != rgb.shape[0]:
            raise ValueError(f"palette_votes: mask has {mask.shape[0]} pixels, image {rgb.shape[0]}")
        rgb = rgb[mask]
    if rgb.shape[0] == 0:
        return {n: 0.0 for n in names}
    refs = np.asarray([palette[n] for n in names], dtype=np.float32) / 255.0
    nearest = np.argmin(((rgb[:, None, :] - refs[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(names))
    return {n: float(c) / rgb.shape[0] for n, c in zip(names, counts)}


def palette_colour(image: Image.Image, palette: Mapping[str, Sequence[int]], mask: np.ndarray | None = None) -> str:
    """The palette colour most (masked) pixels are nearest to; ties go to the earlier palette entry.
    An empty mask falls back to the whole image rather than answering nothing."""
    if mask is not None and not np.asarray(mask).any():
        mask = None
    votes = palette_votes(image, palette, mask)
    return argmax_label(list(votes.values()), list(votes))


def paste_on_gray(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Foreground pixels on GenEval's #999 background (how GenEval shows CLIP an object crop)."""
    rgb = np.asarray(image.convert("RGB")).copy()
    rgb[~np.asarray(mask, dtype=bool)] = GENEVAL_GRAY
    return Image.fromarray(rgb)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


#: include-item keys the scorers here understand; any other key (GenEval++'s ``region``, ``size``,
#: ``attributes``, GenEval's ``position``) is a constraint none of them checks.
CHECKED_ITEM_KEYS = frozenset({"class", "count", "color", "attribute"})


def unverifiable(prompt: Prompt) -> bool:
    """Does the prompt ask for something no scorer here checks: a count > 1, a relative position,
    an exclusion, or an include field beyond class/count/color/attribute? Such an image is reported
    ``unverified`` and left out of every accuracy (it would count as wrong, or right, unchecked)."""
    return bool(prompt.exclude) or any(
        item.get("count", 1) != 1
        or set(item) - CHECKED_ITEM_KEYS
        or (item.get("color") is not None and item.get("attribute") not in (None, item["color"]))  # one is checked
        for item in prompt.include
    )


def attribute_vocab(attribute: str) -> tuple[str, ...] | None:
    for vocab in ATTRIBUTE_VOCABS.values():
        if attribute in vocab:
            return vocab
    return None


# --------------------------------------------------------------------------- CLIP (GenEval protocol)


class ClipScorer:
    """GenEval's colour check and a zero-shot presence check with an open_clip model.

    ``correct`` = every include item's object wins zero-shot against the other GenEval classes and,
    where the item has a colour (or a known shape/texture/size attribute), that attribute wins
    zero-shot against its vocabulary."""

    name = "clip"

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Image.Image], Any],
        tokenizer: Callable[[list[str]], Any],
        *,
        object_names: Sequence[str] | None = None,
        mask_background: bool = False,
        device: str = "cpu",
    ) -> None:
        import torch

        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.object_names = list(object_names) if object_names is not None else load_object_names()
        self.mask_background = mask_background
        scale = getattr(model, "logit_scale", None)
        # Trained CLIP has exp(logit_scale) = 100; a random model still gets a sane temperature.
        self.scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self._text_cache: dict[str, Any] = {}

    @classmethod
    def from_open_clip(
        cls,
        name: str,
        pretrained: str | None = None,
        *,
        device: str = "cpu",
        mask_background: bool = False,
        object_names: Sequence[str] | None = None,
        **overrides: Any,
    ) -> "ClipScorer":
        """``open_clip.create_model_and_transforms(name, pretrained, **overrides)``; ``pretrained`` is
        a tag (e.g. ``"openai"`` for GenEval's ViT-L-14) or a local file; None = random (tests)."""
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, **overrides
            )
        except (OSError, RuntimeError, ValueError) as e:  # offline hub, unknown tag, a bad file
            raise EvalError(
                f"--clip-pretrained {pretrained}: cannot load {name} weights ({str(e).splitlines()[0][:200]}); "
                "download them once and pass the local file, e.g. --clip-pretrained /path/open_clip_model.safetensors"
            ) from None
        tokenizer = open_clip.get_tokenizer(name)
        return cls(
            model, preprocess, tokenizer, object_names=object_names, mask_background=mask_background, device=device
        )

    # -- embeddings (cached per text: the same class prompts recur for every image)

    def _embed_texts(self, texts: Sequence[str]) -> Any:
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.inference_mode():
                feats = self.model.encode_text(self.tokenizer(missing).to(self.device)).float()
            for t, f in zip(missing, feats):
                self._text_cache[t] = f / f.norm()
        return torch.stack([self._text_cache[t] for t in texts])

    def _class_embeddings(self, names: Sequence[str], templates: Sequence[str], obj: str | None = None) -> Any:
        """(K, D) ensembled embeddings; ``names`` fill ``{c}``/``{a}`` (attributes, with ``obj``) or
        ``{obj}`` (object classes, ``obj=None``)."""
        texts = [t.format(c=n, a=n, obj=n if obj is None else obj) for n in names for t in templates]
        emb = self._embed_texts(texts).reshape(len(names), len(templates), -1)
        return average_template_embeddings(emb)

    def _embed_image(self, image: Image.Image) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.encode_image(self.preprocess(image.convert("RGB"))[None].to(self.device)).float()[0]

    # -- scoring

    def score(self, image: Image.Image, prompt: Prompt) -> Score:
        whole = self._embed_image(image)
        attr_emb = whole
        out: Score = {}
        if self.mask_background:
            mask = foreground_mask(image)
            out["foreground_fraction"] = float(mask.mean())
            if mask.any():
                attr_emb = self._embed_image(paste_on_gray(image, mask))
        # a free-form prompt (no include items) names no object to check
        unverified = unverifiable(prompt) or not prompt.include
        correct = bool(prompt.include)
        for i, item in enumerate(prompt.include):
            obj = item["class"]
            candidates = [obj] + [n for n in self.object_names if n != obj]
            class_emb = self._class_embeddings(candidates, [OBJECT_TEMPLATE])
            probs = softmax(zero_shot_logits(whole, class_emb, self.scale).tolist())
            present = argmax_label(probs, candidates) == obj
            out[f"obj{i}_present"] = present
            out[f"obj{i}_p_present"] = probs[0]
            correct &= present
            attribute = attribute_of(item)
            if attribute is None:
                continue
            if item.get("color") is not None:
                vocab, templates = COLORS, COLOR_TEMPLATES
            else:
                vocab, templates = attribute_vocab(attribute), (ATTRIBUTE_TEMPLATE,)
            if vocab is None:
                unverified = True
                continue
            vocab = list(vocab)
            vocab_emb = self._class_embeddings(vocab, templates, obj=obj)
            probs = softmax(zero_shot_logits(attr_emb, vocab_emb, self.scale).tolist())
            predicted = argmax_label(probs, vocab)
            key = "color" if item.get("color") is not None else "attribute"
            out[f"obj{i}_{key}"] = predicted
            out[f"obj{i}_{key}_ok"] = predicted == attribute
            out[f"obj{i}_p_{key}"] = probs[vocab.index(attribute)]
            correct &= predicted == attribute
        out["unverified"] = unverified
        out["correct"] = bool(correct)
        return out


# --------------------------------------------------------------------------- VQA with the UMM itself


def questions_for(prompt: Prompt, template: str = "Is this {article} {phrase}?") -> list[str]:
    """One yes/no question per include item ("Is this a yellow broccoli?"); a prompt without
    include items gets one question about the whole prompt."""
    if not prompt.include:
        return [f"Does this image show {prompt.prompt.rstrip('.')}?"]
    out = []
    for item in prompt.include:
        attribute = attribute_of(item)
        phrase = f"{attribute} {item['class']}" if attribute else item["class"]
        out.append(template.format(article=article(phrase), phrase=phrase))
    return out


class VQAScorer:
    """P(yes) of the UMM's understanding for "Is this a {color} {object}?", per include item.

    ``semantic = encoder.encode([image])``; ``P(yes) = softmax over {yes, no}`` of
    ``adapter.answer_logprob(semantic, [q, q], ["yes", "no"])``. ``correct`` when every item's
    P(yes) exceeds ``threshold``; ``p_yes`` is their product (T2I-CompBench's BLIP-VQA score).

    ``answer_logprob`` sums token log-probabilities, so the comparison is fair only when ``yes``
    and ``no`` are one token each (true of real LLM tokenizers; a byte-level toy tokenizer gives
    "yes" three tokens to "no"'s two, biasing towards "no"). Change the strings with ``yes=``/``no=``
    (e.g. " Yes") to match the model's chat format."""

    name = "vqa"

    def __init__(
        self,
        adapter: Any,
        encoder: Any,
        *,
        threshold: float = 0.5,
        template: str = "Is this {article} {phrase}?",
        yes: str = "yes",
        no: str = "no",
    ) -> None:
        self.adapter = adapter
        self.encoder = encoder
        self.threshold = threshold
        self.template = template
        self.answers = (yes, no)

    def _device(self) -> Any:
        params = getattr(self.adapter, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return None

    def encode(self, image: Image.Image) -> Any:
        import torch

        with torch.inference_mode():
            semantic = self.encoder.encode([image.convert("RGB")])
        device = self._device()
        return semantic.to(device) if device is not None else semantic

    def p_yes(self, semantic: Any, questions: Sequence[str]) -> list[float]:
        """P(yes) for each question about one image's ``semantic`` tokens (1, N, D), in one call."""
        import torch

        if semantic.shape[0] != 1:
            raise ValueError(f"VQAScorer.p_yes: expected tokens of one image (1, N, D), got {tuple(semantic.shape)}")
        k = len(questions)
        prompts = [q for q in questions for _ in range(2)]
        answers = list(self.answers) * k
        with torch.inference_mode():
            logprobs = self.adapter.answer_logprob(semantic.expand(2 * k, *semantic.shape[1:]), prompts, answers)
        logprobs = [float(v) for v in logprobs]
        if len(logprobs) != 2 * k:
            raise EvalError(f"answer_logprob returned {len(logprobs)} values for {2 * k} prompts")
        return [p_yes_from_logprobs(logprobs[2 * j], logprobs[2 * j + 1]) for j in range(k)]

    def score(self, image: Image.Image, prompt: Prompt) -> Score:
        semantic = self.encode(image)
        return vqa_checks(prompt, lambda qs: self.p_yes(semantic, qs), template=self.template, threshold=self.threshold)


def vqa_checks(
    prompt: Prompt, ask: Callable[[list[str]], list[float]], *, template: str, threshold: float = 0.5
) -> Score:
    """One image's checks from ``ask(questions) -> P(yes) each``.

    A DPG-Bench prompt asks its own questions; a "yes" is P(yes) > ``threshold`` and a question
    whose parent got a "no" scores 0 (:func:`eval.dpg.image_scores`); ``correct`` = every question
    scores 1. Any other prompt asks :func:`questions_for` (one per include item); ``p_yes`` is
    their product (T2I-CompBench's BLIP-VQA score) and ``correct`` = every P(yes) > ``threshold``."""
    dpg = dpg_questions(prompt)
    if dpg is not None:
        out: Score = image_scores(dpg, ask([q["question"] for q in dpg]), threshold)
        out["unverified"] = False
        out["correct"] = out["dpg_score"] == 1.0
        return out
    probs = ask(questions_for(prompt, template))
    out = {f"obj{i}_p_yes": p for i, p in enumerate(probs)}
    out["p_yes"] = math.prod(probs)
    out["unverified"] = unverifiable(prompt)
    out["correct"] = all(p > threshold for p in probs)
    return out


# --------------------------------------------------------------------------- VQA with a transformers BLIP model


class HFVQAScorer:
    """P(yes) of a transformers ``BlipForQuestionAnswering`` for each question about an image.

    BLIP answers by decoding from ``decoder_start_token_id`` over the question's embeddings
    (``BlipForQuestionAnswering.generate``); we score the two answers instead of sampling one:
    the decoder's summed log-likelihood of ``yes`` and of ``no`` (each ``[bos] answer [SEP]``),
    renormalised over the two (:func:`p_yes_from_logprobs`). T2I-CompBench's BLIP-VQA reads
    P(yes) the same way; DPG-Bench takes the generated answer, which for a yes/no question is
    the likelier of the two — "yes" here when P(yes) > ``threshold``."""

    name = "hf-vqa"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str = "cpu",
        threshold: float = 0.5,
        template: str = "Is this {article} {phrase}?",
        yes: str = "yes",
        no: str = "no",
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.threshold = threshold
        self.template = template
        self.answers = (yes, no)

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", **kwargs: Any) -> "HFVQAScorer":
        """``BlipForQuestionAnswering`` + ``AutoProcessor`` from a local dir or a cached hub id."""
        from transformers import AutoProcessor, BlipForQuestionAnswering

        try:
            processor = AutoProcessor.from_pretrained(path)
            model = BlipForQuestionAnswering.from_pretrained(path)
        except (OSError, ValueError) as e:  # not cached offline, no such dir, a bad repo id
            raise EvalError(
                f"--vqa-model {path}: cannot load a BLIP VQA model ({str(e).splitlines()[0][:200]}); download it "
                "once (e.g. `huggingface-cli download Salesforce/blip-vqa-base --local-dir DIR`) and pass "
                "--vqa-model DIR"
            ) from None
        return cls(model, processor, device=device, **kwargs)

    def p_yes(self, image: Image.Image, questions: Sequence[str]) -> list[float]:
        """P(yes) for each question about ``image``, in one batch of ``2 × len(questions)`` answers."""
        import torch

        from reca.models.common import IGNORE, answer_logprobs

        k = len(questions)
        tok = self.processor.tokenizer
        with torch.inference_mode():
            pixels = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
            image_embeds = self.model.vision_model(pixel_values=pixels.to(self.device))[0].expand(k, -1, -1)
            q = tok(list(questions), padding=True, return_tensors="pt").to(self.device)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            q_embeds = self.model.text_encoder(
                input_ids=q.input_ids,
                attention_mask=q.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
            )[0]
            a = tok(list(self.answers), padding=True, return_tensors="pt").to(self.device)
            ids = a.input_ids.repeat(k, 1)  # yes, no, yes, no, ...
            ids[:, 0] = self.model.decoder_start_token_id  # [CLS] → BLIP's [DEC], as generate() starts
            mask = a.attention_mask.repeat(k, 1)
            hidden = self.model.text_decoder.bert(
                input_ids=ids,
                attention_mask=mask,
                encoder_hidden_states=q_embeds.repeat_interleave(2, 0),
                encoder_attention_mask=q.attention_mask.repeat_interleave(2, 0),
                is_decoder=True,
            )[0]
            labels = ids.masked_fill(mask == 0, IGNORE)
            logp, valid = answer_logprobs(hidden, labels, self.model.text_decoder.cls)
            total = (logp * valid).sum(1).tolist()
        return [p_yes_from_logprobs(total[2 * j], total[2 * j + 1]) for j in range(k)]

    def score(self, image: Image.Image, prompt: Prompt) -> Score:
        return vqa_checks(prompt, lambda qs: self.p_yes(image, qs), template=self.template, threshold=self.threshold)


# --------------------------------------------------------------------------- palette (synthetic worlds)


class PaletteScorer:
    """Colour by majority nearest-palette colour of the foreground (:func:`foreground_mask`).

    One colour item: the majority colour must be it. Several: each requested colour must hold at
    least ``min_share`` of the foreground. Objects are not checked (flat synthetic shapes have no
    class); non-colour attributes are ``unverified``."""

    name = "palette"

    def __init__(
        self,
        palette: Mapping[str, Sequence[int]] | None = None,
        *,
        use_mask: bool = True,
        min_share: float = 0.2,
        threshold: float = 0.15,
    ) -> None:
        self.palette = dict(palette or GENEVAL_PALETTE)
        self.use_mask = use_mask
        self.min_share = min_share
        self.threshold = threshold

    def score(self, image: Image.Image, prompt: Prompt) -> Score:
        mask = foreground_mask(image, self.threshold) if self.use_mask else None
        if mask is not None and not mask.any():
            mask = None
        votes = palette_votes(image, self.palette, mask)
        colours = [item["color"] for item in prompt.include if item.get("color")]
        out: Score = {"color": argmax_label(list(votes.values()), list(votes))}
        for i, item in enumerate(prompt.include):
            if item.get("color"):
                out[f"obj{i}_share"] = votes.get(item["color"], 0.0)
        if len(colours) == 1:
            correct = out["color"] == colours[0]
        else:
            correct = all(votes.get(c, 0.0) >= self.min_share for c in colours)
        # colour is all it sees: shape/texture attributes, or a prompt with no colour, are not checked
        out["unverified"] = (
            unverifiable(prompt) or not colours or any(attribute_of(i) and not i.get("color") for i in prompt.include)
        )
        out["correct"] = bool(correct) and bool(colours)
        return out


# --------------------------------------------------------------------------- construction


def load_scorer(spec: str, **kwargs: Any) -> Scorer:
    """Build a scorer from ``"package.module:Factory"`` (a class or function) with ``kwargs``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvalError(
            f"--scorer {spec}: expected 'clip', 'vqa', 'hf-vqa', 'palette' or an import path 'package.module:Factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EvalError(f"--scorer {spec}: cannot import ({e})") from None
    scorer = factory(**kwargs)
    if not isinstance(getattr(scorer, "name", None), str) or not callable(getattr(scorer, "score", None)):
        raise EvalError(
            f"--scorer {spec}: built a {type(scorer).__name__} without a 'name' and a 'score(image, prompt)' method"
        )
    return scorer


def build_scorer(kind: str, **kwargs: Any) -> Scorer:
    """``clip`` → :meth:`ClipScorer.from_open_clip`, ``vqa`` → :class:`VQAScorer` (needs
    ``adapter=`` and ``encoder=``), ``palette`` → :class:`PaletteScorer`, ``hf-vqa`` →
    :meth:`HFVQAScorer.from_pretrained` (needs ``path=``), else :func:`load_scorer`."""
    if kind == "clip":
        kwargs.setdefault("name", "ViT-L-14")
        return ClipScorer.from_open_clip(**kwargs)
    if kind == "vqa":
        return VQAScorer(**kwargs)
    if kind == "palette":
        return PaletteScorer(**kwargs)
    if kind == "hf-vqa":
        return HFVQAScorer.from_pretrained(**kwargs)
    return load_scorer(kind, **kwargs)
