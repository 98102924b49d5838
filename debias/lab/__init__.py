"""Building the lab world (``python -m debias.lab.build``): it trains, from ``configs/lab/world.yaml``, a tiny Janus
(real ``JanusForConditionalGeneration``) on captioned renders with a planted demographic skew per occupation and a
tiny CLIP classifier, and writes them to ``generators/lab/weights``. The world itself (renderer, weights, the ``lab``
generator backend) lives in :mod:`generators.lab`, the floor that serves it.

One module per concern: :mod:`~debias.lab.world` (config schema, captions, tokenizers), :mod:`~debias.lab.vq`
(image tokenizer), :mod:`~debias.lab.train_janus`, :mod:`~debias.lab.train_clip`, :mod:`~debias.lab.verify`
(measured with the audit's sampler and classifier) and :mod:`~debias.lab.build` (orchestration and command line).
"""
