"""Fine-tuning image-token generators (Janus, Emu3) to remove demographic bias: SFT, BPO and a group-frequency
objective on TRL.

Public entry points (imported lazily, so ``import debias.train`` stays light):

* :func:`run_train` (``debias.train.run``): train in this process; returns the final adapter folder.
* :func:`main_train` (``debias.train.launch``): the ``debias train`` command; re-launches under ``accelerate launch``
  when the config asks for several processes.
* :class:`TrainConfig` (``debias.train.config``): the ``train:`` config section.
"""

from __future__ import annotations

from debias.train.config import TrainConfig

__all__ = ["TrainConfig", "main_train", "run_train"]


def __getattr__(name: str):
    if name == "run_train":
        from debias.train.run import run_train

        return run_train
    if name == "main_train":
        from debias.train.launch import main_train

        return main_train
    raise AttributeError(f"module 'debias.train' has no attribute {name!r}")
