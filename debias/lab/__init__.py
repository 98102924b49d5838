"""Building the lab world (:mod:`debias.lab.build`): it trains, from ``configs/lab/world.yaml``, a tiny Janus (real
``JanusForConditionalGeneration``) on captioned renders with a planted demographic skew per occupation and a tiny
CLIP classifier, and writes them to ``generators/lab/weights``. The world itself (renderer, weights, the ``lab``
generator backend) lives in :mod:`generators.lab`, the floor that serves it.
"""
