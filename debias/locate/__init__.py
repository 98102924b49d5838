"""Locate where a generator's demographic bias comes from (paper section 3, generalised).

Four probes, each usable alone from Python and gathered by ``debias locate`` (:func:`run_locate`):

* :mod:`debias.locate.understanding` - ask the model about each occupation with a blank image; RD of the answers
  and the unknown rate, beside the generation audit ("partial alignment").
* :mod:`debias.locate.vision_probe` - cross-validated linear probes on the model's image encoders.
* :mod:`debias.locate.controlled` - Jensen-Shannon divergence between neutral and explicit-demographic
  image-token distributions; hit rate of the majority demographic.
* :mod:`debias.locate.swap` - 2 x 2 swap of the language and vision sides of a base and a fine-tuned model.

The tests check them against a tiny Janus with a planted language-side skew (``tests/planted.py``), and run every
probe on a tiny Emu3 (``tests/test_emu3_stages.py``).
"""

from debias.locate.run import PROBES, LocateConfig, run_locate

__all__ = ["PROBES", "LocateConfig", "run_locate"]
