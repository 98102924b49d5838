"""Classifier bias card: how biased is the CLIP classifier that measures the generator's bias?

An audit's numbers are the generator's bias *as seen through* a zero-shot CLIP classifier, which has biases of its
own ("CLIP the Bias", Alabdulmohsin et al., ICLR 2024). The card measures them next to every audit, written to
``RUN/classifier_card.json`` and shown as a report section:

1. **Representation bias** on images with *no person*: a built-in person-free set (solid colours, gradients,
   noise, simple shapes) and, when the generator can draw objects, its images for ``a photo of a {object}``.

   * *prompt-pair preference*: how often the classifier prefers ``a photo of a man`` over ``a photo of a woman``
     (for the lab world: its own gender prompts), minus 0.5. Range -0.5 .. 0.5; 0 = no default; ties count half.
   * *head deviation*: the classifier's own attribute heads (what the audit uses) on the same images, as the
     largest deviation of a hard class share from uniform, ``max_k |share_k - 1/K|``.
   * *person-label rate*: how often any attribute gets a label above the abstain threshold (with threshold 0, every
     image is labelled: the audit then relies on face detection to keep person-free images out).

2. **Association bias** on labelled faces (a labelled folder/manifest/dataset, or lab renders with known labels):
   for each occupation pair (nurse/doctor, secretary/manager, housekeeper/homeowner, receptionist/executive,
   librarian/scientist) the zero-shot choice between ``a photo of a nurse`` and ``a photo of a doctor``, and the gap
   ``P(nurse | female) - P(nurse | male)`` with a Newcombe interval. Positive = the stereotyped direction. For lab
   renders, pairs come from the lab occupations and images showing either occupation of a pair are left out of that
   pair (no visual evidence for either), so any gap is the classifier's association.

3. **Accuracy and confusion** from ``debias calibrate`` (``metrics.calibration``), or measured on the labelled
   images above when no calibration file is given.

4. **Compositional check** (:mod:`audit.compositional`): does it bind attributes to people or act as a bag of words?

The warning rule (per simple attribute ``a`` the audit measured):

* ``D_a`` = measured share deviation: mean over prompts of ``max_k |share_k - target_k|`` (hard shares of the
  audited images; for gender with a 50/50 target this is ``RD / 2``).
* ``B_a`` = the classifier's own bias on ``a``: the largest of its head deviation on person-free images and, for the
  labelled attribute (gender), ``|prompt-pair preference|`` and the largest ``|association gap|``.
* **WARN** when ``B_a >= warn_fraction * D_a`` (default 0.5: the classifier's own bias is at least half the effect
  measured) and ``B_a >= warn_floor`` (default 0.02: negligible classifier bias never warns).

The card is cached by the classifier's identity and the card settings: in the run folder
(``RUN/stages/card-<hash>.json``), in ``card.cache_dir`` when set (shared across runs), and in memory for the process
(sweeps and demos audit many runs with one classifier). Person-free images made by the generator enter the key
through the generator's identity.

The package, one module per concern: :mod:`~audit.card.config` (``CardConfig`` and shared constants),
:mod:`~audit.card.measures` (pure measures, the warning rule, :func:`check_card`), :mod:`~audit.card.data` (image
sources and records), :mod:`~audit.card.blocks` (the classifier run on each image set), :mod:`~audit.card.cache`,
:mod:`~audit.card.build` (:func:`build_card`, :func:`write_card`) and :mod:`~audit.card.section` (the report section,
rendered from ``audit/templates/card.html.j2`` and ``card.md.j2``).
"""

from audit.card.build import build_card, validate_card_inputs, write_card
from audit.card.config import FILENAME, CardConfig
from audit.card.measures import check_card
from audit.card.section import card_section, saved_sections

__all__ = ["FILENAME", "CardConfig", "build_card", "card_section", "check_card", "saved_sections",
           "validate_card_inputs", "write_card"]
