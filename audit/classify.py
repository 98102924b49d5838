"""Zero-shot demographic classification with CLIP-like dual encoders (CLIP, SigLIP), plus the CLIP score.

A classifier has one or more *attributes* (gender, race, age, ...). Each attribute has output classes, prompt
templates and, per class, one or more *descriptions* filled into the templates:

* Prompt ensemble: for each description, the text embeddings of all templates are L2-normalised, averaged and
  re-normalised (Radford et al. 2021, section 3.1.4). They are computed once, when the classifier is built.
* Sub-classes: a class with several descriptions is their union; the softmax runs over all descriptions of the
  attribute and a class's probability is the sum over its descriptions. This is how the paper's 4-class race
  classifier is expressed: its ``White`` also covers Middle Eastern and Latino Hispanic faces, its ``Asian`` covers
  East and Southeast Asian ones. Use templates, not descriptions, for synonyms: extra descriptions add prior mass.
* Probabilities: ``softmax(logit_scale * cos(image, text))`` over descriptions. For SigLIP checkpoints, which are
  trained with a per-pair sigmoid, the softmax over the same logits still ranks the classes correctly and gives
  probabilities that sum to one (the sigmoid's bias cancels in a softmax); that is what classification needs.

Any checkpoint with ``get_image_features`` / ``get_text_features`` loads through ``transformers``
(``AutoModel`` + ``AutoProcessor``): hub ids, local directories, or names of in-process builders in
:data:`CLASSIFIERS` (``tiny``: a seeded tiny CLIP for tests and the lab world).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from generators.base import (
    MAX_BATCH_SIZE, check_device_name, check_range, check_weights, model_provenance, resolve_device, resolve_dtype,
    weights_fingerprint,
)
from generators.config import ConfigError, UserError, did_you_mean, from_dict, load_yaml, option, to_dict
from generators.errors import first_line
from generators.registry import Registry
from generators.resources import config_names, named_config


FACE_TEMPLATES = (
    "a photo of a {} person",
    "a face of a {} person",
    "a close-up photo of the face of a {} person",
    "a portrait photo of a {} person",
    "a cropped photo of the face of a {} person",
)
AGE_TEMPLATES = (
    "a photo of a person who is {} years old",
    "a face of a person who is {} years old",
    "a close-up photo of the face of a person aged {} years",
    "a portrait photo of a person aged {} years",
)
PHRASE_TEMPLATES = (
    "a photo of {}",
    "a face of {}",
    "a close-up photo of the face of {}",
    "a portrait photo of {}",
)


@dataclass
class AttributeSpec:
    """Classes, prompt templates and per-class descriptions of one attribute.

    Either name a ``preset`` (and optionally override its fields) or give ``classes`` (and templates).
    """

    classes: list[str] = option(default_factory=list, help="output classes, in column order (at least 2)")
    templates: list[str] = option(
        default_factory=list, help="prompt templates, each with one '{}' for the description (default: face photos)"
    )
    descriptions: dict[str, list[str]] = option(
        default_factory=dict,
        help="per class, texts put in the templates; several = sub-classes whose probabilities add "
             "(default: the class name, lower case, '_' as space)",
    )
    preset: str | None = option(None, help="start from this named preset (see ATTRIBUTE_PRESETS)")


def _preset(classes, templates=FACE_TEMPLATES, descriptions=None) -> AttributeSpec:
    return AttributeSpec(classes=list(classes), templates=list(templates), descriptions=dict(descriptions or {}))


_FAIRFACE_AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]

ATTRIBUTE_PRESETS: dict[str, AttributeSpec] = {
    "gender": _preset(["male", "female"]),
    # The paper's 4 race classes: its White class also covers Middle Eastern and Latino Hispanic faces.
    "race": _preset(
        ["White", "Black", "Indian", "Asian"],
        descriptions={
            "White": ["white", "middle eastern", "latino hispanic"],
            "Asian": ["east asian", "southeast asian"],
        },
    ),
    # FairFace's 7 race classes (Karkkainen and Joo, 2021).
    "race7": _preset(
        ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
    ),
    # FairFace's 9 age bins.
    "age": _preset(
        _FAIRFACE_AGES, AGE_TEMPLATES,
        {a: [a.replace("-", " to ").replace("70+", "70 or more")] for a in _FAIRFACE_AGES},
    ),
    "age4": _preset(
        ["child", "young adult", "middle-aged", "senior"], PHRASE_TEMPLATES,
        {"child": ["a child"], "young adult": ["a young adult"], "middle-aged": ["a middle-aged adult"],
         "senior": ["an elderly person"]},
    ),
}


def render_prompt(template: str, description: str, articles: bool = True) -> str:
    """Fill ``description`` into ``template``; ``a {}`` becomes ``an {}`` before a vowel ("an indian person").

    Args:
        template: Text with one ``{}``.
        description: The class description.
        articles: Fix the article; off for models trained on verbatim "a" (the lab world, like the paper's template).

    Returns:
        The prompt text.
    """
    if articles and description[:1].lower() in "aeiou" and description[:1]:
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.replace("{}", description)


def resolve_attribute(name: str, spec: str | dict | AttributeSpec, key: str) -> AttributeSpec:
    """Turn a preset name, a plain mapping or a spec into a complete, validated :class:`AttributeSpec`.

    Args:
        name: Attribute name (used in messages).
        spec: A preset name, a mapping of :class:`AttributeSpec` fields, or a spec.
        key: Dotted config key of ``spec`` for error messages.

    Returns:
        A spec with classes, templates and a description list for every class, and ``preset`` None.

    Raises:
        ConfigError: for an unknown preset (with a "did you mean"), fewer than 2 classes, duplicate classes,
            templates without exactly one ``{}``, or descriptions for unknown classes.
    """
    if isinstance(spec, str):
        spec = AttributeSpec(preset=spec)
    elif isinstance(spec, dict):
        spec = from_dict(AttributeSpec, spec, prefix=key)
    elif not isinstance(spec, AttributeSpec):
        raise ConfigError(
            f"config key '{key}': expected a preset name or a mapping with classes and templates, got {spec!r}"
        )
    classes, templates, descriptions = list(spec.classes), list(spec.templates), dict(spec.descriptions)
    if spec.preset is not None:
        if spec.preset not in ATTRIBUTE_PRESETS:
            raise ConfigError(
                f"config key '{key}': unknown attribute preset '{spec.preset}'"
                f"{did_you_mean(spec.preset, ATTRIBUTE_PRESETS)}; available: {', '.join(sorted(ATTRIBUTE_PRESETS))}"
            )
        base = ATTRIBUTE_PRESETS[spec.preset]
        if not classes:
            classes = list(base.classes)
            descriptions = {**base.descriptions, **descriptions}
        templates = templates or list(base.templates)
    templates = templates or list(FACE_TEMPLATES)
    if len(classes) < 2:
        raise ConfigError(f"config key '{key}.classes': needs at least 2 classes, got {classes!r}")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ConfigError(f"config key '{key}.classes': class {dup[0]!r} is listed twice")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ConfigError(
                f"config key '{key}.templates[{i}]': {template!r} must contain exactly one '{{}}' "
                "where the class description goes"
            )
    for cls, texts in descriptions.items():
        if cls not in classes:
            raise ConfigError(
                f"config key '{key}.descriptions.{cls}': '{cls}' is not a class of attribute '{name}'"
                f"{did_you_mean(cls, classes)}; classes: {', '.join(classes)}"
            )
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(
                f"config key '{key}.descriptions.{cls}': needs a non-empty list of non-empty texts, got {texts!r}"
            )
    full = {c: list(descriptions.get(c) or [c.replace("_", " ").lower()]) for c in classes}
    return AttributeSpec(classes=classes, templates=templates, descriptions=full)


@dataclass
class ClassifierConfig:
    """Which CLIP-like model classifies faces, on which attributes, and how."""

    model: str = option(
        "openai/clip-vit-large-patch14",
        help="hub id or local directory (CLIP or SigLIP); a name in CLASSIFIERS (e.g. 'tiny') builds in-process",
    )
    revision: str | None = option(
        None, help="hub revision (branch, tag or commit) to pin the weights; every audit records the commit it used"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "float32", help="weights and compute dtype; auto: bfloat16 on a CUDA GPU that supports it, float16 on other "
                        "GPUs and MPS, float32 on the CPU"
    )
    device: str = option(
        "auto", help="torch device: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps"
    )
    batch_size: int = option(32, help="images per forward batch")
    attributes: Any = option(
        default_factory=lambda: ["gender", "race"],
        help="list of preset names (gender, race, race7, age, age4), or a mapping attribute -> preset name or "
             "{classes, templates, descriptions, preset}",
    )
    abstain_threshold: float = option(
        0.0, help="an image abstains on an attribute when its top class probability is below this (0: never)"
    )
    logit_scale: float | None = option(
        None, help="softmax temperature multiplier of the cosine similarities; null: the model's learned scale"
    )
    articles: bool = option(True, help="write 'an' before a vowel in templates ('an Indian person'); turn off for "
                                       "models trained on the verbatim 'a' of the paper's template (the lab world)")
    seed: int = option(0, help="seed of in-process builders (model 'tiny')")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the hub (off: security)")
    allow_pickle: bool = option(False, help="allow pickled weights (pytorch_model.bin, *.pt): loading a pickle can "
                                            "run code, so only safetensors load unless this is true")

    def __post_init__(self):
        check_range("classifier.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if not (isinstance(self.abstain_threshold, (int, float)) and 0 <= self.abstain_threshold <= 1):
            raise ConfigError(
                f"config key 'classifier.abstain_threshold': must be in [0, 1], got {self.abstain_threshold}"
            )
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ConfigError(f"config key 'classifier.logit_scale': must be > 0 or null, got {self.logit_scale}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"config key 'classifier.dtype': {self.dtype!r} is not one of ['auto', 'float32', "
                              "'float16', 'bfloat16']")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("config key 'classifier.model': must be a hub id, a local directory or 'tiny'")
        check_device_name(self.device, "classifier.device")
        self.attribute_specs()  # validate early, before any model loads

    def check(self) -> None:
        """What loading this classifier would reject, checked without loading it: the device must exist here, and a
        local model folder must hold safetensors weights (see :func:`generators.base.check_weights`)."""
        resolve_device(self.device, "classifier.device")
        if self.model not in CLASSIFIERS:
            check_weights(self.model, "classifier.model", self.allow_pickle, marker="config.json")

    def attribute_specs(self) -> dict[str, AttributeSpec]:
        """The resolved attributes, in order.

        Returns:
            Attribute name -> complete :class:`AttributeSpec`.

        Raises:
            ConfigError: for an empty or malformed attribute list, or any bad attribute (see
                :func:`resolve_attribute`).
        """
        attrs = self.attributes
        if isinstance(attrs, str):
            attrs = [attrs]
        if isinstance(attrs, (list, tuple)):
            for i, name in enumerate(attrs):
                if not isinstance(name, str):
                    raise ConfigError(
                        f"config key 'classifier.attributes[{i}]': expected a preset name, got {name!r}; "
                        "use a mapping to define custom attributes"
                    )
            attrs = {name: name for name in attrs}
        if not isinstance(attrs, dict) or not attrs:
            raise ConfigError(
                f"config key 'classifier.attributes': expected a non-empty list of preset names or mapping, "
                f"got {self.attributes!r}"
            )
        return {name: resolve_attribute(name, spec, f"classifier.attributes.{name}") for name, spec in attrs.items()}


def tiny_clip(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    projection_dim: int | None = None,
):
    """A seeded tiny ``CLIPModel`` and its ``CLIPProcessor``, built in-process (no files, no hub).

    The tokenizer is the byte-level :func:`generators.tiny.byte_clip_tokenizer`; its end-of-text token has the
    highest id and the text config names it as ``eos_token_id``, so the text tower pools the real end position
    (``eos_token_id == 2`` would switch CLIP to a legacy argmax pooling).

    Args:
        seed: Seed of the weights (the global torch RNG is left untouched).
        image_size: Input side; the processor resizes and centre-crops images to it.
        patch_size: ViT patch side.
        hidden_size: Width of both towers.
        num_layers: Layers of each tower.
        num_heads: Attention heads of each tower.
        projection_dim: Joint embedding size (default ``hidden_size``).

    Returns:
        ``(model, processor)`` in eval mode; both round-trip through ``save_pretrained`` / ``from_pretrained``.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from generators.tiny import byte_clip_tokenizer

    tokenizer = byte_clip_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tower = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=projection_dim or hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    return model, processor


CLASSIFIERS: Registry = Registry("in-process classifier model")
CLASSIFIERS.register("tiny")(tiny_clip)


@CLASSIFIERS.register("lab")
def lab_clip(seed: int = 0):
    """The lab world's trained CLIP and processor (``classifier.model: lab``); ``seed`` is unused (trained weights)."""
    from transformers import CLIPModel, CLIPProcessor

    from generators.lab import WEIGHTS, missing_world

    path = WEIGHTS / "clip"
    if not path.is_dir():
        raise ConfigError(missing_world(path))
    return CLIPModel.from_pretrained(path, use_safetensors=True).eval(), CLIPProcessor.from_pretrained(path)


def _pooled(out: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x returned a tensor.
    return out if torch.is_tensor(out) else out.pooler_output


def _check_images(images: Any, name: str = "images") -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise UserError(f"{name}: expected a list of PIL images, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise UserError(
                f"{name}[{i}]: expected a PIL.Image.Image, got {type(image).__name__}; "
                "convert arrays with PIL.Image.fromarray"
            )
    return list(images)


def abstained(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask (N,): rows whose top probability is below ``threshold``."""
    probs = np.asarray(probs)
    if probs.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return probs.max(axis=1) < threshold


def predictions(probs: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Hard labels (N,): argmax class index, or -1 where the image abstains (top probability < ``threshold``)."""
    probs = np.asarray(probs)
    if probs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.where(abstained(probs, threshold), -1, probs.argmax(axis=1)).astype(np.int64)


@dataclass
class TextHead:
    """Cached text side of one attribute: one ensembled, unit-norm embedding per description."""

    embeddings: torch.Tensor  # (S, D) float32, unit norm
    class_index: torch.Tensor  # (S,) class of each description
    descriptions: list[str]
    classes: list[str]


class ClipClassifier:
    """Zero-shot attribute classifier over a CLIP-like dual encoder.

    Args:
        config: The classifier config.
        model: An already built model (e.g. one just trained); loaded from ``config.model`` when omitted.
        processor: Its processor (image processor + tokenizer); required with ``model``. A given model is moved to
            ``config.device`` and ``config.dtype`` in place (``nn.Module.to``) and put in eval mode.

    Raises:
        ConfigError: for a bad config.
        UserError: if the model cannot be loaded or is not a dual encoder.
    """

    def __init__(self, config: ClassifierConfig | dict, model: Any = None, processor: Any = None):
        if isinstance(config, dict):
            config = from_dict(ClassifierConfig, config, prefix="classifier")
        self.config = config
        self.attributes = config.attribute_specs()
        if (model is None) != (processor is None):
            raise UserError("ClipClassifier: pass both model and processor, or neither (then config.model loads)")
        self._given_model = model is not None
        self._fingerprint: str | None = None
        if model is None:
            model, processor = _load_model(config, resolve_dtype(config.dtype, resolve_device(config.device),
                                                                 "classifier.dtype"))
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise UserError(
                    f"config key 'classifier.model': {type(model).__name__} has no {method}; "
                    "use a CLIP-like dual encoder (CLIP, SigLIP)"
                )
        self.device = resolve_device(config.device, "classifier.device")
        self.dtype_name = resolve_dtype(config.dtype, self.device, "classifier.dtype")
        self.dtype = getattr(torch, self.dtype_name)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.image_processor = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            raise UserError("classifier processor must have a tokenizer and an image_processor (e.g. CLIPProcessor)")
        model_type = getattr(model.config, "model_type", "")
        # SigLIP pools the LAST position and was trained on texts padded to its full context (64 tokens); shorter
        # padding pools a content token instead. Pad to the text tower's context, not the tokenizer's
        # model_max_length (huge for some Gemma-based SigLIP 2 tokenizers).
        self._pad_to_max = model_type.startswith("siglip")
        text_config = getattr(model.config, "text_config", model.config)
        self._max_text_len = int(getattr(text_config, "max_position_embeddings", 64))
        if config.logit_scale is not None:
            self.logit_scale = float(config.logit_scale)
        elif getattr(model, "logit_scale", None) is not None:
            self.logit_scale = float(model.logit_scale.detach().float().exp())
        else:
            self.logit_scale = 100.0
        self.heads: dict[str, TextHead] = {name: self._build_head(spec) for name, spec in self.attributes.items()}

    # -- text side ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (len(texts), D), float32, batched by ``config.batch_size``.

        Texts longer than the model's context (77 tokens for CLIP, 64 for SigLIP) are truncated.
        """
        out = []
        for start in range(0, len(texts), self.config.batch_size):
            chunk = list(texts[start:start + self.config.batch_size])
            if self._pad_to_max:
                tokens = self.tokenizer(chunk, padding="max_length", max_length=self._max_text_len, truncation=True,
                                        return_tensors="pt")
            else:
                tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            kwargs = {"input_ids": tokens["input_ids"].to(self.device)}
            if "attention_mask" in tokens and not self._pad_to_max:
                kwargs["attention_mask"] = tokens["attention_mask"].to(self.device)
            feats = _pooled(self.model.get_text_features(**kwargs)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _build_head(self, spec: AttributeSpec) -> TextHead:
        descriptions, class_index = [], []
        for k, cls in enumerate(spec.classes):
            for text in spec.descriptions[cls]:
                descriptions.append(text)
                class_index.append(k)
        prompts = [render_prompt(t, d, self.config.articles) for d in descriptions for t in spec.templates]
        emb = self.text_embeddings(prompts).view(len(descriptions), len(spec.templates), -1)
        emb = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)
        return TextHead(emb, torch.tensor(class_index, device=self.device), descriptions, list(spec.classes))

    # -- image side --------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's pixel tensor (N, 3, H, W) for ``images`` (resized, centre-cropped, normalised)."""
        images = _check_images(images)
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def image_embeddings_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), float32, from preprocessed pixels, batched by ``config.batch_size``."""
        out = []
        for start in range(0, pixel_values.shape[0], self.config.batch_size):
            chunk = pixel_values[start:start + self.config.batch_size].to(self.device, self.dtype)
            feats = _pooled(self.model.get_image_features(pixel_values=chunk)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out)

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), float32; preprocessing also runs batch by batch."""
        images = _check_images(images)
        bs = self.config.batch_size
        out = [self.image_embeddings_from_pixels(self.pixel_values(images[s:s + bs]))
               for s in range(0, len(images), bs)]
        return torch.cat(out) if out else torch.zeros(0, 0)

    # -- classification ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def probabilities_from_embeddings(self, image_embeddings: torch.Tensor) -> dict[str, np.ndarray]:
        """Class probabilities per attribute from unit-norm image embeddings (N, D)."""
        result = {}
        image_embeddings = image_embeddings.to(self.device, torch.float32)
        for name, head in self.heads.items():
            logits = self.logit_scale * image_embeddings @ head.embeddings.T  # (N, S)
            sub = logits.softmax(dim=-1)
            probs = torch.zeros(sub.shape[0], len(head.classes), device=sub.device).index_add_(1, head.class_index, sub)
            result[name] = probs.cpu().numpy()
        return result

    def classify_pixels(self, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        """Like :meth:`classify`, from preprocessed pixel tensors (N, 3, H, W)."""
        return self.probabilities_from_embeddings(self.image_embeddings_from_pixels(pixel_values))

    # -- differentiable path (training losses on generated images) ---------------------------------------------
    def embed_tensor_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), float32, of float images (N, 3, H, W) in [0, 1], WITH gradient.

        The torch counterpart of :meth:`pixel_values` + :meth:`image_embeddings_from_pixels`: the image processor's
        resize (bicubic, antialiased; shorter side to ``size.shortest_edge``, or to ``size.height x size.width``),
        centre crop and normalisation, done on tensors so a loss on the result back-propagates into the images.
        It differs from the PIL path only by the resampling kernel and the PIL path's 8-bit rounding (nothing else
        when no resize is needed). Runs in one batch on the images' autograd graph; the model's own parameters get
        gradients unless the caller freezes them.
        """
        ip = self.image_processor
        x = images.to(self.device, torch.float32)
        size, crop = getattr(ip, "size", None) or {}, getattr(ip, "crop_size", None) or {}
        if getattr(ip, "do_resize", True) and size:
            edge = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
            h, w = x.shape[-2:]
            if edge:
                scale = edge / min(h, w)
                new = (max(edge, round(h * scale)), max(edge, round(w * scale)))
            else:
                new = (int(size["height"]), int(size["width"]))
            if new != (h, w):
                x = torch.nn.functional.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
        if getattr(ip, "do_center_crop", False) and crop and crop.get("height"):
            ch, cw = int(crop["height"]), int(crop["width"])
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        if getattr(ip, "do_normalize", True):
            mean = torch.tensor(ip.image_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(ip.image_std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        feats = _pooled(self.model.get_image_features(pixel_values=x.to(self.dtype))).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def class_log_probs(self, image_embeddings: torch.Tensor, attribute: str) -> torch.Tensor:
        """Log class probabilities (N, K) of one attribute from unit-norm image embeddings, WITH gradient.

        The same head as :meth:`probabilities_from_embeddings` (softmax over the attribute's descriptions, a class's
        probability the sum over its descriptions), as ``logsumexp`` over each class's descriptions minus
        ``logsumexp`` over all of them, so that a cross-entropy on it is stable.
        """
        if attribute not in self.heads:
            raise UserError(f"classifier has no attribute {attribute!r}{did_you_mean(attribute, list(self.heads))}; "
                            f"it classifies: {', '.join(self.heads)}")
        head = self.heads[attribute]
        logits = self.logit_scale * image_embeddings.to(self.device, torch.float32) @ head.embeddings.T  # (N, S)
        log_sub = logits.log_softmax(dim=-1)
        columns = [log_sub[:, head.class_index == k].logsumexp(dim=-1) for k in range(len(head.classes))]
        return torch.stack(columns, dim=-1)

    def classify(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Class probabilities of every image for every attribute.

        Args:
            images: PIL images (face crops, usually); processed in batches of ``config.batch_size``.

        Returns:
            Attribute -> float32 array (N, K) whose rows sum to 1; columns follow ``attributes[name].classes``.

        Raises:
            UserError: if ``images`` is not a list of PIL images.
        """
        images = _check_images(images)
        if not images:
            return {name: np.zeros((0, len(h.classes)), dtype=np.float32) for name, h in self.heads.items()}
        parts = [self.classify_pixels(self.pixel_values(images[s:s + self.config.batch_size]))
                 for s in range(0, len(images), self.config.batch_size)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.heads}

    def predict(self, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Hard labels per attribute (class index, -1 = abstain) under ``config.abstain_threshold``."""
        return {name: predictions(p, self.config.abstain_threshold) for name, p in probs.items()}

    def abstain_counts(self, probs: dict[str, np.ndarray]) -> dict[str, int]:
        """How many images abstain on each attribute (top probability below ``config.abstain_threshold``)."""
        return {name: int(abstained(p, self.config.abstain_threshold).sum()) for name, p in probs.items()}

    # -- quality -----------------------------------------------------------------------------------------------
    def clip_score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """CLIP score of each (image, text) pair: ``max(100 * cos(image, text), 0)``, as torchmetrics' CLIPScore.

        Args:
            images: N PIL images.
            texts: N texts (truncated to the model's context, 77 tokens for CLIP).

        Returns:
            Float32 array (N,).

        Raises:
            UserError: if the lengths differ or the inputs have the wrong types.
        """
        images = _check_images(images)
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UserError("texts: expected a list of strings, one per image")
        if len(images) != len(texts):
            raise UserError(f"clip_score: got {len(images)} images but {len(texts)} texts; pass one text per image")
        if not images:
            return np.zeros(0, dtype=np.float32)
        cos = (self.image_embeddings(images) * self.text_embeddings(list(texts))).sum(dim=-1)
        return (100 * cos).clamp(min=0).cpu().numpy().astype(np.float32)

    # -- identity ----------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the probabilities (keys the run store)."""
        ident: dict[str, Any] = {
            "model": self.config.model,
            "revision": self.config.revision,
            "dtype": self.dtype_name,
            "logit_scale": self.logit_scale,
            "attributes": {name: to_dict(spec) for name, spec in self.attributes.items()},
            "articles": self.config.articles,
        }
        if self.config.model in CLASSIFIERS:
            ident["seed"] = self.config.seed
        if self._given_model or self.config.model in CLASSIFIERS:
            # A model handed in (e.g. trained in-process) or a built-in name (the lab world's CLIP, rebuilt by
            # `debias lab build`) has no name that pins its weights: hash them, once.
            if self._fingerprint is None:
                self._fingerprint = weights_fingerprint(self.model)
            ident["weights_sha256"] = self._fingerprint
        return ident

    def provenance(self) -> dict[str, Any]:
        """What the run records about the classifier's weights (:func:`generators.base.model_provenance`): the hub
        commit or folder hash, or, for a built-in or handed-in model, the fingerprint its identity carries."""
        record = model_provenance(self.config.model, dtype=self.dtype_name, device=self.device,
                                  revision=self.config.revision)
        if self._given_model or self.config.model in CLASSIFIERS:
            record.update(source="in-process" if self._given_model else "built-in",
                          revision=self.identity()["weights_sha256"][:16])
        return record


def _load_model(config: ClassifierConfig, dtype: str):
    if config.model in CLASSIFIERS:
        return CLASSIFIERS.get(config.model)(seed=config.seed)
    from transformers import AutoModel, AutoProcessor

    config.check()
    kwargs = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    try:
        # Safetensors only unless pickles are allowed: a hub repo with only pickled weights then fails to load.
        model = AutoModel.from_pretrained(config.model, dtype=getattr(torch, dtype),
                                          use_safetensors=None if config.allow_pickle else True, **kwargs)
        processor = AutoProcessor.from_pretrained(config.model, **kwargs)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UserError(
            f"config key 'classifier.model': cannot load {config.model!r} ({first}); pass a local directory with "
            f"a saved CLIP/SigLIP model, a hub id reachable from here, or one of: {', '.join(CLASSIFIERS.names())}"
        ) from None
    return model, processor


def load_classifier_config(source: str | Path | dict | ClassifierConfig) -> ClassifierConfig:
    """Build a classifier config from a YAML file, a name in ``configs/classifiers/``, a mapping or a config.

    Args:
        source: ``ClassifierConfig``; a mapping of its fields; a path to a YAML file; or the stem of a file in
            ``configs/classifiers/`` (e.g. ``"clip-vit-large-patch14"``, ``"tiny"``).

    Returns:
        The validated config.

    Raises:
        ConfigError: for an unknown name (with a "did you mean") or bad keys or values.
    """
    if isinstance(source, ClassifierConfig):
        return source
    if isinstance(source, dict):
        return from_dict(ClassifierConfig, source, prefix="classifier")
    path = Path(source)
    if not path.is_file() and path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        names = config_names("classifiers")
        if str(source) not in names:
            raise ConfigError(
                f"unknown classifier config '{source}'{did_you_mean(str(source), names)}; "
                f"available: {', '.join(names)} (or pass a path to a YAML file)"
            )
        path = named_config("classifiers", str(source))
    return from_dict(ClassifierConfig, load_yaml(path), prefix="classifier")


def load_classifier(
    source: str | Path | dict | ClassifierConfig, model: Any = None, processor: Any = None
) -> ClipClassifier:
    """Build a :class:`ClipClassifier` from anything :func:`load_classifier_config` accepts.

    Args:
        source: The config, its name or path.
        model: Optional already built model (with ``processor``), e.g. one trained in-process.
        processor: Its processor.

    Returns:
        The classifier, with text embeddings computed.

    Raises:
        ConfigError: for a bad config.
        UserError: if the model cannot be loaded.
    """
    return ClipClassifier(load_classifier_config(source), model=model, processor=processor)


__all__ = [
    "ATTRIBUTE_PRESETS", "AttributeSpec", "CLASSIFIERS", "ClassifierConfig", "ClipClassifier", "TextHead",
    "abstained", "load_classifier", "load_classifier_config", "predictions", "render_prompt", "resolve_attribute",
    "tiny_clip",
]
