"""The lab world: a small synthetic world the toolkit ships so the whole audit -> locate -> fix loop runs offline.

* :mod:`debias.lab.render` draws 32x32 stylised people whose pixels encode gender, a 4-level skin tone (labelled with
  the paper's race class names) and one of 8 occupations.
* :mod:`debias.lab.build` trains, from ``configs/lab/world.yaml``, a tiny Janus (real ``JanusForConditionalGeneration``)
  on captioned renders with a planted demographic skew per occupation and a tiny CLIP classifier, and writes them to
  ``debias/lab/weights`` (``janus/``, ``clip/``, ``world.yaml``, ``build_info.json``).

The planted skew is the ground truth an audit must recover and a fix must remove.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
