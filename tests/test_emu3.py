"""The Emu3 backend on a tiny real Emu3: per-seed determinism, the constrained layout, CFG, agreement with
transformers' own Emu3 image generation, scoring, understanding, encoders, adapters and save/load."""

import numpy as np
import pytest
import torch

from generators.backends import load_generator
from generators.base import GeneratorConfig
from generators.config import ConfigError
from generators.emu3 import Emu3Generator
from generators.emu3_sequence import image_grid
from generators.tiny import tiny_emu3

PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a senator, a person"]


def emu3(**sampling):
    return load_generator({"backend": "emu3", "model": "tiny", "device": "cpu", "batch_size": 8,
                           "sampling": {"guidance_scale": 3.0, "image_area": 1024, **sampling}})


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_emu3_same_seed_same_image_whatever_the_batch():
    g = emu3()
    eight = g.generate([PROMPTS[0]] * 8, list(range(8)))
    one = g.generate([PROMPTS[0]], [5])[0]
    # mixed prompts pad the shorter prompt (and the negative rows) on the left: the image must not change
    mixed = g.generate([PROMPTS[1], PROMPTS[0]], [9, 5])[1]
    assert eight[5].tokens == one.tokens == mixed.tokens
    assert np.array_equal(pixels(eight[5].image), pixels(one.image))
    assert np.array_equal(pixels(mixed.image), pixels(one.image))
    assert eight[4].tokens != eight[5].tokens  # different seeds, different images
    assert len(one.tokens) == g.num_image_tokens == 16 and g.codebook_size == 64
    assert all(0 <= t < 64 for t in one.tokens)


def test_emu3_greedy_equals_argmax_of_teacher_forced_cfg_logits():
    g = emu3(do_sample=False)
    tokens = g.sample_tokens(PROMPTS, [0, 1])
    ids, mask = g.encode(PROMPTS)
    with torch.no_grad():
        logits = g.layout.logits(g.model, ids, mask, tokens, guidance_scale=3.0)
        plain = g.layout.logits(g.model, ids, mask, tokens)
    assert logits.shape == (2, 16, 64)
    assert torch.equal(logits.argmax(-1), tokens)
    # without CFG the logits differ: the test above really exercises the guidance (negative-prompt) path
    assert not torch.allclose(plain, logits)


def test_emu3_logprobs_and_distributions_match_the_sampler():
    g = emu3(top_k=8, temperature=0.7)
    tokens = g.sample_tokens(PROMPTS, [3, 4])
    dist = g.token_distribution(PROMPTS, tokens)
    assert dist.shape == (2, 16, 64) and torch.allclose(dist.sum(-1), torch.ones(2, 16))
    assert ((dist > 0).sum(-1) == 8).all()  # top-k 8: exactly the distribution each token was drawn from
    assert (dist.gather(-1, tokens.unsqueeze(-1)) > 0).all()
    with torch.no_grad():
        lp = g.logprobs(PROMPTS, tokens, guidance_scale=3.0)
        ids, mask = g.encode(PROMPTS)
        direct = torch.log_softmax(g.layout.logits(g.model, ids, mask, tokens, 3.0) / 0.7, -1)
    assert lp.shape == (2, 16) and torch.all(lp <= 0)
    assert torch.allclose(lp, direct.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("ratio, area", [("1:1", 1024), ("2:1", 2048), ("1:2", 2048), ("16:9", 4000)])
def test_emu3_constrained_layout_always_decodes_to_the_configured_size(ratio, area):
    g = emu3(ratio=ratio, image_area=area)
    # The token grid is transformers' Emu3Processor's for the same ratio and area ...
    processed = g.processor(text=["x"], return_for_image_generation=True, ratio=ratio, image_area=area)
    assert tuple(processed["image_sizes"][0]) == g.layout.grid == image_grid(ratio, area, 8)
    h, w = g.layout.grid
    assert g.image_size == (8 * h, 8 * w)
    # ... and every sampled image, whatever its tokens, has the configured size.
    images = g.generate([PROMPTS[0]] * 3, [0, 1, 2])
    assert {im.image.size for im in images} == {(8 * w, 8 * h)}
    assert all(len(im.tokens) == h * w for im in images)
    # The generated part of the sequence: W visual tokens and a line break per row, then end of frame/image/sequence.
    seq = g.layout.sequence(torch.tensor([images[0].tokens]))[0].tolist()
    ids = g.ids
    assert len(seq) == h * (w + 1) + 3 and seq[-3:] == [ids.eof, ids.eoi, ids.eos]
    assert [seq[r * (w + 1) + w] for r in range(h)] == [ids.eol] * h
    visual = set(g.layout.visual.tolist())
    assert all(seq[r * (w + 1) + c] in visual for r in range(h) for c in range(w))


def test_emu3_greedy_agrees_with_transformers_image_generation():
    """Our seeded, constrained, CFG loop vs ``model.generate`` with the docs' prefix_allowed_tokens_fn and a
    negative prompt (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor), fp32, greedy."""
    negative, template, guidance = "lowres, blurry, bad anatomy", "{prompt} masterpiece.", 3.0
    g = emu3(do_sample=False, negative_prompt=negative, prompt_template=template, image_area=1600,
             guidance_scale=guidance)
    model, proc, tok = g.model, g.processor, g.tokenizer
    for prompt in PROMPTS:
        inputs = proc(text=[template.format(prompt=prompt)], return_for_image_generation=True, image_area=1600,
                      return_tensors="pt")
        neg = proc(text=[negative], return_for_image_generation=True, image_area=1600, return_tensors="pt")
        ids, mask = g.encode([prompt])
        assert torch.equal(inputs.input_ids, ids)  # the prompt layout is the processor's
        height, width = (int(x) for x in inputs["image_sizes"][0])
        visual = model.vocabulary_mapping.image_tokens

        def prefix_allowed_tokens_fn(batch_id, input_ids):
            position = torch.nonzero(input_ids == tok.image_wrapper_token_id, as_tuple=True)[0][0]
            offset = input_ids.shape[0] - position
            if offset % (width + 1) == 0:
                return (model.vocabulary_mapping.eol_token_id,)
            if offset == (width + 1) * height + 1:
                return (tok.eof_token_id,)
            if offset == (width + 1) * height + 2:
                return (tok.eoi_token_id,)
            if offset == (width + 1) * height + 3:
                return (tok.eos_token_id,)
            if offset > (width + 1) * height + 3:
                return (tok.pad_token_id,)
            return visual

        with torch.no_grad():
            out = model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                 max_new_tokens=200, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                 do_sample=False, guidance_scale=guidance, negative_prompt_ids=neg.input_ids,
                                 negative_prompt_attention_mask=neg.attention_mask)
        theirs = out[:, inputs.input_ids.shape[1]:]
        ours = g.sample_tokens([prompt], [0])
        assert torch.equal(g.layout.sequence(ours), theirs)
        decoded = model.decode_image_tokens(image_tokens=theirs, height=height, width=width)
        reference = proc.postprocess(list(decoded.float()), return_tensors="PIL.Image.Image")["pixel_values"][0]
        assert np.array_equal(pixels(g.decode(ours)[0]), pixels(reference))


def test_emu3_save_load_roundtrip_through_the_config_path(tmp_path):
    from transformers import Emu3ForConditionalGeneration

    model, processor = tiny_emu3(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_generator({"backend": "emu3", "model": str(tmp_path), "device": "cpu",
                             "sampling": {"guidance_scale": 3.0, "image_area": 1024}})
    assert isinstance(loaded.model, Emu3ForConditionalGeneration)
    a, b = emu3().generate(PROMPTS, [3, 4]), loaded.generate(PROMPTS, [3, 4])
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert all(np.array_equal(pixels(x.image), pixels(y.image)) for x, y in zip(a, b))


def test_real_size_check_runs_its_small_version(tmp_path):
    """The real-size check (benchmarks/real_size_emu3.py) in its small form: the same build -> save_pretrained ->
    generator config -> sample path, on an architecture small enough for the test suite."""
    from benchmarks.real_size_emu3 import main

    result = main(["--small", "--out", str(tmp_path / "model")])
    assert result["image_size"] == [16, 16] and result["tokens"] == 4
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()


def test_emu3_settings_validation():
    with pytest.raises(ConfigError, match=r"generator.sampling.ratio': must be 'W:H'"):
        emu3(ratio="square")
    with pytest.raises(ConfigError, match=r"generator.sampling.image_area': 16 pixels at ratio 1:1 give a 0 x 0"):
        emu3(image_area=16)
    with pytest.raises(ConfigError, match=r"generator.sampling.guidance_scale': must be >= 1"):
        emu3(guidance_scale=0.5)
    with pytest.raises(ConfigError, match=r"config key 'generator.sampling.negativ_prompt' is unknown"):
        emu3(negativ_prompt="x")


def test_emu3_adapter_from_config_changes_the_images_and_keys_the_store(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_emu3(seed=0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q|v)_proj",
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    sampling = {"guidance_scale": 3.0, "image_area": 1024, "do_sample": False}
    base = Emu3Generator(GeneratorConfig(backend="emu3", model="tiny", device="cpu", sampling=sampling))
    tuned = Emu3Generator(GeneratorConfig(backend="emu3", model="tiny", device="cpu", sampling=sampling,
                                          adapter=str(tmp_path / "adapter")))
    ids, mask = tuned.encode(PROMPTS)
    zeros = torch.zeros((2, 16), dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(tuned.layout.logits(peft, ids, mask, zeros), tuned.layout.logits(tuned.model, ids, mask,
                                                                                             zeros))
    assert not torch.equal(base.sample_tokens(PROMPTS, [0, 1]), tuned.sample_tokens(PROMPTS, [0, 1]))
    assert tuned.identity()["adapter_hash"] and base.identity()["adapter_hash"] is None


def test_emu3_understanding_through_its_chat_layout():
    from generators.emu3_sequence import blank_inputs, question_ids

    g = emu3()
    template = "You are a helpful assistant. USER: {image}{question} ASSISTANT:"
    question = "What is the gender of a nurse? Possible answers: male, female, unknown"
    # The question row is what Emu3Processor makes of <image> for the blank image.
    inputs = blank_inputs(g.image_processor)
    grid = tuple(int(x) // 8 for x in inputs["image_sizes"][0])
    processed = g.processor(images=[np.zeros((32, 32, 3), dtype=np.uint8)],
                            text=[template.format(image="<image>", question=question)], return_tensors="pt")
    assert question_ids(g.tokenizer, g.ids, question, grid, template) == processed.input_ids[0].tolist()
    # Answers are seeded per answer: the same seed gives the same answer whatever the batch.
    kwargs = dict(template=template, max_new_tokens=5, temperature=1.5)
    four = g.answer([question] * 4, [0, 1, 2, 3], **kwargs)
    alone = g.answer([question], [2], **kwargs)
    assert four[2] == alone[0] and len(set(four)) > 1
    # The blank's image features come from the model's VQ path: a different blank changes the answers' inputs.
    with torch.no_grad():
        white = g.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        black = blank_inputs(g.image_processor, "black")
        black = g.model.model.get_image_features(black["pixel_values"], black["image_sizes"]).pooler_output[0]
    assert white.shape == (grid[0] * (grid[1] + 1), 32) and not torch.equal(white, black)


def test_emu3_image_encoders():
    g = emu3()
    images = [im.image for im in g.generate(PROMPTS, [0, 1])]
    assert set(g.image_encoders()) == {"vq", "embedded"}
    assert g.embed_images(images, "vq").shape == (2, 4)  # latent channels, mean over the 4 x 4 grid
    assert g.embed_images(images, "vq", pool="flatten").shape == (2, 4 * 4 * 4)
    assert g.embed_images(images, "embedded").shape == (2, 32)  # the language model's hidden size
    with pytest.raises(Exception, match="has no encoder 'vision'"):
        g.embed_images(images, "vision")


def test_emu3_components_are_its_text_model_and_vq_model():
    g = emu3()
    root = g.module_root()
    parts = g.components()
    assert parts == {"language": ["model.text_model", "lm_head"], "vision": ["model.vqmodel"]}
    covered = tuple(f"{p}." for paths in parts.values() for p in paths)
    assert all(name.startswith(covered) for name, _ in root.named_parameters())  # the two sides cover the model
