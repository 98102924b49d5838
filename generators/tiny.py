"""Seeded tiny models built from configs in-process: real architectures, random weights, no hub.

Used by tests, smoke configs and benchmarks (tiny Janus, tiny Emu3, tiny Stable Diffusion). Every builder returns
objects that ``save_pretrained`` and load back with ``from_pretrained`` exactly like the real checkpoints they stand
in for.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

# Words of the prompt sets the smoke configs use, so tiny tokenizers map them to real ids instead of <unk>.
BASE_WORDS = (
    "a an the photo of face person male female man woman white black indian asian what is gender race "
    "possible answers unknown ? , . : in with and from for who as to family home monthly income"
).split()

JANUS_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]
JANUS_ROLES = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                   extra_special_tokens={"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
                                         "image_token": "<image_placeholder>"})

# Emu3's special tokens (the names of BAAI/Emu3-*-hf's tokenizer) and the roles its processor reads them in.
EMU3_SPECIALS = ["<|endoftext|>", "<unk>", "<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>",
                 "<|image end|>", "<|image token|>", "<|extra_201|>", "<|extra_200|>"]
EMU3_ROLES = dict(pad_token="<|endoftext|>", unk_token="<unk>", bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                  extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>",
                                        "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                                        "eof_token": "<|extra_201|>"})


def word_tokenizer(words: Iterable[str], specials: list[str] = JANUS_SPECIALS, roles: dict = JANUS_ROLES):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, punctuation split off) over ``specials + words``.

    Special tokens keep the ids of their position in ``specials``: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ...;
    ``roles`` names them (``pad_token``, ..., ``extra_special_tokens``).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*specials, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode table (the alphabet of byte-level BPE), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_tokenizer(specials: list[str] = JANUS_SPECIALS, roles: dict = JANUS_ROLES, added: Iterable[str] = (),
                   unused: int = 0):
    """A byte-level ``PreTrainedTokenizerFast`` (no merges): every text tokenizes, none to <unk>.

    The vocabulary is ``specials``, the 256 byte symbols, ``unused`` never-produced filler tokens, then ``added``
    (e.g. Emu3's visual tokens); ``roles`` names the specials, and every token of ``specials`` and ``added`` is a
    special token, so a text never splits one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(specials)}
    for sym in byte_symbols():
        vocab.setdefault(sym, len(vocab))
    for n in range(unused):
        vocab[f"<|unused{n}|>"] = len(vocab)
    added = list(added)
    for a in added:
        vocab.setdefault(a, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    named = {v for v in roles.values() if isinstance(v, str)} | set(roles.get("extra_special_tokens", {}).values())
    tokenizer.add_tokens([t for t in [*specials, *added] if t not in named], special_tokens=True)
    return tokenizer


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """Lower-cased word and punctuation tokens of ``prompts`` (vocabulary for a tiny tokenizer)."""
    words: dict[str, None] = {}
    for p in prompts:
        for w in re.findall(r"\w+|[^\w\s]", p.lower()):
            words.setdefault(w, None)
    return list(words)


def tiny_janus_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_patches: int = 4,
    codebook_size: int = 64,
    channel_multiplier: tuple[int, ...] = (1, 2),
    base_channels: int = 32,
    image_size: int | None = None,
):
    """A ``JanusConfig`` small enough for unit tests (defaults: 16 image tokens, 8x8 decoded images)."""
    from transformers import JanusConfig

    side = num_patches * 2 ** (len(channel_multiplier) - 1)
    image_size = image_size or side
    return JanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=1, num_attention_heads=4,
            image_size=image_size, patch_size=max(1, image_size // num_patches), projection_dim=hidden_size,
            num_image_tokens=num_patches**2, mlp_ratio=2.0,
        ),
        vq_config=dict(
            embed_dim=8, num_embeddings=codebook_size, base_channels=base_channels,
            channel_multiplier=list(channel_multiplier), num_res_blocks=1, latent_channels=8,
            num_patches=num_patches, image_token_embed_dim=hidden_size, projection_dim=hidden_size,
        ),
        image_token_id=6,
    )


def tiny_janus(seed: int = 0, words: Iterable[str] | None = None, **config_kwargs):
    """Seeded tiny ``JanusForConditionalGeneration`` and its tokenizer.

    Args:
        seed: torch seed for the random weights.
        words: vocabulary for a word-level tokenizer; ``None`` uses a byte-level one that tokenizes any prompt.
        **config_kwargs: passed to :func:`tiny_janus_config`.

    Returns:
        ``(model, tokenizer)``; both round-trip through ``save_pretrained`` / ``from_pretrained``.
    """
    from transformers import GenerationConfig, JanusForConditionalGeneration

    tokenizer = byte_tokenizer() if words is None else word_tokenizer([*BASE_WORDS, *words])
    torch.manual_seed(seed)
    config = tiny_janus_config(vocab_size=len(tokenizer), **config_kwargs)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")},
    )
    return model, tokenizer


def tiny_emu3_config(
    vocabulary_map: dict[str, int],
    codebook_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    channel_multiplier: tuple[int, ...] = (1, 1, 1, 1),
    base_channels: int = 32,
):
    """An ``Emu3Config`` small enough for unit tests. The VQ keeps Emu3's spatial factor 8 (four levels), so a
    32 x 32 image is 4 x 4 tokens, as transformers' ``Emu3Processor`` assumes; one frame (no temporal layers)."""
    from transformers import Emu3Config

    ids = vocabulary_map
    return Emu3Config(
        text_config=dict(
            vocab_size=len(ids), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|extra_203|>"], eos_token_id=ids["<|extra_204|>"],
        ),
        vq_config=dict(
            codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=base_channels,
            channel_multiplier=list(channel_multiplier), num_res_blocks=1, attn_resolutions=[],
            hidden_size=base_channels * channel_multiplier[-1], num_attention_heads=1, temporal_downsample_factor=1,
        ),
        vocabulary_map=dict(ids),
    )


def emu3_processor(codebook_size: int = 64, image_side: int = 32, vocab_size: int | None = None):
    """An ``Emu3Processor``: a byte-level tokenizer with Emu3's special tokens and one ``<|visual token{c:06d}|>`` per
    code (the last ``codebook_size`` ids, as in Emu3's vocabulary), and an ``Emu3ImageProcessor`` that keeps
    ``image_side`` x ``image_side`` images (its smallest size: the understanding path's blank image).

    Args:
        codebook_size: VQ codes.
        image_side: smallest square side the image processor keeps.
        vocab_size: pad the vocabulary with unused tokens to this size (a real-size embedding and ``lm_head``).
    """
    from transformers import Emu3ImageProcessor, Emu3Processor

    fill = 0 if vocab_size is None else vocab_size - codebook_size - len(EMU3_SPECIALS) - 256
    if fill < 0:
        raise ValueError(f"vocab_size {vocab_size} cannot hold {codebook_size} codes, the specials and 256 bytes")
    visual = [f"<|visual token{c:06d}|>" for c in range(codebook_size)]
    tokenizer = byte_tokenizer(EMU3_SPECIALS, EMU3_ROLES, added=visual, unused=fill)
    image_processor = Emu3ImageProcessor(min_pixels=image_side**2, max_pixels=(2 * image_side) ** 2)
    return Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)


def emu3_generation_config(tokenizer):
    """The generation config an Emu3 checkpoint ships (bos, eos, pad)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def tiny_emu3(seed: int = 0, codebook_size: int = 64, image_side: int = 32, **config_kwargs):
    """Seeded tiny ``Emu3ForConditionalGeneration`` and its ``Emu3Processor`` (:func:`emu3_processor`).

    Args:
        seed: torch seed for the random weights.
        codebook_size: VQ codes, each a ``<|visual token{c:06d}|>`` of the vocabulary.
        image_side: the image processor's smallest (and default) square side: the understanding path's blank image.
        **config_kwargs: passed to :func:`tiny_emu3_config`.

    Returns:
        ``(model, processor)``; both round-trip through ``save_pretrained`` / ``from_pretrained``.
    """
    from transformers import Emu3ForConditionalGeneration

    processor = emu3_processor(codebook_size, image_side)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(tiny_emu3_config(tokenizer.get_vocab(), codebook_size, **config_kwargs)).eval()
    model.generation_config = emu3_generation_config(tokenizer)
    return model, processor


def byte_clip_tokenizer():
    """A ``CLIPTokenizer`` over the 256 byte-level symbols (no merges): every text tokenizes, none to <unk>."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_safety_checker(seed: int = 0, image_size: int = 32, threshold: float = 1.0):
    """A real ``StableDiffusionSafetyChecker`` (the one SD 1.5 ships) at tiny size, and its feature extractor.

    Its 17 concept embeddings are seeded random vectors; an image is flagged when its cosine similarity to one of
    them exceeds that concept's threshold (``concept_embeds_weights``, all ``threshold``: the default 1.0 flags
    nothing, lower values flag more). The 3 special-care concepts never fire (threshold 2).
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1, **tower),
                        vision_config=dict(image_size=image_size, patch_size=8, **tower), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker = StableDiffusionSafetyChecker(config).eval()
        with torch.no_grad():
            checker.concept_embeds.copy_(torch.randn(17, 32))
            checker.special_care_embeds.copy_(torch.randn(3, 32))
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(2.0)
    extractor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return checker, extractor


def tiny_diffusion_pipeline(seed: int = 0, sample_size: int = 32, safety_checker: bool = False,
                            nsfw_threshold: float = 1.0):
    """Seeded tiny ``StableDiffusionPipeline`` (UNet (32, 64), 2-layer CLIP text encoder, DDIM).

    ``safety_checker`` adds a :func:`tiny_safety_checker` with concept thresholds ``nsfw_threshold``, as SD 1.5
    ships one; without it the pipeline has none.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    checker, extractor = tiny_safety_checker(seed, sample_size, nsfw_threshold) if safety_checker else (None, None)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=checker, feature_extractor=extractor, requires_safety_checker=safety_checker,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
