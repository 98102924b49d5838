"""Generator adapters on tiny real models: determinism per seed, batching, CFG path, save/load."""

import numpy as np
import pytest
import torch

from generators.backends import load_generator
from generators.base import GeneratorConfig
from generators.config import ConfigError
from generators.janus import JanusGenerator
from generators.janus_sequence import image_logits, image_token_logprobs

PROMPTS = ["A photo of the face of a nurse, a person", "A photo of the face of a senator, a person"]


def janus(**sampling):
    return load_generator({"backend": "janus", "model": "tiny", "device": "cpu", "batch_size": 8,
                           "sampling": {"guidance_scale": 3.0, **sampling}})


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_janus_same_seed_same_image_whatever_the_batch():
    g = janus()
    eight = g.generate([PROMPTS[0]] * 8, list(range(8)))
    one = g.generate([PROMPTS[0]], [5])[0]
    # mixed prompts pad the shorter prompt on the left: the image must not change
    mixed = g.generate([PROMPTS[1], PROMPTS[0]], [9, 5])[1]
    assert eight[5].tokens == one.tokens == mixed.tokens
    assert np.array_equal(pixels(eight[5].image), pixels(one.image))
    assert np.array_equal(pixels(mixed.image), pixels(one.image))
    assert eight[4].tokens != eight[5].tokens  # different seeds, different images
    assert len(one.tokens) == g.num_image_tokens == 16


def test_janus_greedy_equals_argmax_of_teacher_forced_cfg_logits():
    g = janus(do_sample=False)
    tokens = g.sample_tokens(PROMPTS, [0, 1])
    ids, mask = g.encode(PROMPTS)
    with torch.no_grad():
        logits = image_logits(g.model, ids, mask, tokens, g.ids, guidance_scale=3.0)
    assert torch.equal(logits.argmax(-1), tokens)
    # without CFG the argmax differs in general: the test above really exercises the guidance path
    with torch.no_grad():
        plain = image_logits(g.model, ids, mask, tokens)
    assert not torch.allclose(plain, logits)


def test_janus_logprobs_match_sampling_distribution():
    g = janus(do_sample=False)
    tokens = g.sample_tokens(PROMPTS[:1], [0])
    with torch.no_grad():
        lp = g.logprobs(PROMPTS[:1], tokens, guidance_scale=3.0)
        ids, mask = g.encode(PROMPTS[:1])
        direct = image_token_logprobs(g.model, ids, mask, tokens, g.ids, 3.0)
    assert lp.shape == (1, 16) and torch.all(lp <= 0)
    assert torch.allclose(lp, direct)


def test_janus_save_load_roundtrip(tmp_path):
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    g = janus()
    g.model.save_pretrained(tmp_path)
    g.tokenizer.save_pretrained(tmp_path)
    cfg = GeneratorConfig(backend="janus", model=str(tmp_path), device="cpu", sampling={"guidance_scale": 3.0})
    loaded = JanusGenerator(cfg)
    assert isinstance(loaded.model, JanusForConditionalGeneration)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), type(g.tokenizer))
    assert g.generate(PROMPTS, [3, 4])[1].tokens == loaded.generate(PROMPTS, [3, 4])[1].tokens


def test_janus_settings_validation():
    with pytest.raises(ConfigError, match=r"generator.sampling.guidance_scale': must be >= 1"):
        janus(guidance_scale=0.5)
    with pytest.raises(ConfigError, match=r"generator.sampling.prompt_template': 'x' has no '\{prompt\}'"):
        janus(prompt_template="x")
    with pytest.raises(ConfigError, match=r"config key 'generator.sampling.cfg' is unknown"):
        janus(cfg=2)


def test_top_k_one_is_greedy():
    g_top1 = janus(top_k=1)
    g_greedy = janus(do_sample=False)
    assert torch.equal(g_top1.sample_tokens(PROMPTS, [1, 2]), g_greedy.sample_tokens(PROMPTS, [7, 8]))


def test_filter_logits_keeps_top_k_and_the_smallest_nucleus():
    from generators.sequence import filter_logits

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, 3, 1.0)) == [True, True, True, False]
    assert kept(filter_logits(logits, 0, 0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 0, 1.0)) == [True] * 4
    # an unsorted row: the nucleus follows probability, not position
    assert kept(filter_logits(logits[:, [2, 0, 3, 1]], 0, 0.7)) == [False, True, False, True]


def test_text_sampling_is_batch_invariant_and_stops_at_eos():
    from generators.sequence import left_pad, sample_text_tokens

    g = janus()
    rows = [g.tokenizer("a nurse", add_special_tokens=False).input_ids,
            g.tokenizer("a photo of the face of a senator", add_special_tokens=False).input_ids]
    pad = g.tokenizer.pad_token_id
    ids, mask = left_pad(rows, pad)
    both = sample_text_tokens(g.model, ids, mask, [3, 4], 6, temperature=1.5, pad_id=pad)
    alone = sample_text_tokens(g.model, *left_pad(rows[:1], pad), [3], 6, temperature=1.5, pad_id=pad)
    assert both.shape == (2, 6) and torch.equal(both[0], alone[0])
    # with row 0's second token as eos, row 0 stops there and is padded afterwards
    eos = int(both[0, 1])
    stopped = sample_text_tokens(g.model, ids, mask, [3, 4], 6, temperature=1.5, eos_id=eos, pad_id=pad)
    first_eos = int((stopped[0] == eos).nonzero()[0])
    assert first_eos <= 1 and (stopped[0, first_eos + 1:] == pad).all()


@pytest.fixture(scope="module")
def sd():
    return load_generator({"backend": "diffusers", "model": "tiny", "device": "cpu", "batch_size": 4,
                           "sampling": {"num_inference_steps": 3, "height": 32, "width": 32}})


def test_diffusers_seed_determinism(sd):
    four = sd.generate([PROMPTS[0]] * 4, [0, 1, 2, 3])
    again = sd.generate([PROMPTS[0]] * 4, [0, 1, 2, 3])
    one = sd.generate([PROMPTS[0]], [2])[0]
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(four, again))
    # Batched kernels round differently for other batch shapes (~1e-6): at most one 8-bit step apart.
    assert np.abs(pixels(four[2].image) - pixels(one.image)).max() <= 1
    assert np.abs(pixels(four[1].image) - pixels(four[2].image)).max() > 10
    assert four[0].image.size == (32, 32)


def test_diffusers_scheduler_swap_and_errors(sd):
    g = load_generator({"backend": "diffusers", "model": "tiny", "device": "cpu",
                        "sampling": {"num_inference_steps": 2, "scheduler": "EulerDiscreteScheduler"}})
    assert type(g.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ConfigError, match="unknown scheduler 'EulerDiscreteSchedular'; did you mean 'EulerDiscreteScheduler'"):
        load_generator({"backend": "diffusers", "model": "tiny", "sampling": {"scheduler": "EulerDiscreteSchedular"}})
    with pytest.raises(ConfigError, match="must be a multiple of 8"):
        load_generator({"backend": "diffusers", "model": "tiny", "sampling": {"height": 30}})


def test_diffusers_save_load_roundtrip(sd, tmp_path):
    sd.pipeline.save_pretrained(tmp_path)
    loaded = load_generator({"backend": "diffusers", "model": str(tmp_path), "device": "cpu", "batch_size": 4,
                             "sampling": {"num_inference_steps": 3, "height": 32, "width": 32}})
    a, b = sd.generate([PROMPTS[1]], [7])[0], loaded.generate([PROMPTS[1]], [7])[0]
    assert np.array_equal(pixels(a.image), pixels(b.image))


def test_janus_adapter_from_config_and_merge(tmp_path):
    from peft import LoraConfig, get_peft_model

    from generators.tiny import tiny_janus

    model, tok = tiny_janus(seed=0)
    # init_lora_weights=False: a random (non-identity) adapter, so it visibly changes the model
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q|v)_proj",
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    sampling = {"guidance_scale": 3.0, "do_sample": False}
    base = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", sampling=sampling))
    tuned = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", sampling=sampling,
                                           adapter=str(tmp_path / "adapter")))
    merged = JanusGenerator(GeneratorConfig(backend="janus", model="tiny", device="cpu", sampling=sampling,
                                            adapter=str(tmp_path / "adapter"), merge_adapter=True))
    ids, mask = tuned.encode(PROMPTS)
    with torch.no_grad():
        expected = image_logits(peft, ids, mask, torch.zeros((2, 16), dtype=torch.long))
        got = image_logits(tuned.model, ids, mask, torch.zeros((2, 16), dtype=torch.long))
        got_merged = image_logits(merged.model, ids, mask, torch.zeros((2, 16), dtype=torch.long))
    assert torch.equal(expected, got)
    assert torch.allclose(got, got_merged, atol=1e-5)
    assert not torch.equal(base.sample_tokens(PROMPTS, [0, 1]), tuned.sample_tokens(PROMPTS, [0, 1]))
    # the adapter's content hash keys the run store, so a retrained adapter never reuses stale images
    assert tuned.identity()["adapter_hash"] and base.identity()["adapter_hash"] is None
