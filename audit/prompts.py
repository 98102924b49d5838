"""Prompt sets: the neutral template, occupation lists and explicit-demographic variants."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators.config import ConfigError, from_dict, load_yaml, option
from generators.resources import project_path

PAPER_TEMPLATE = "A photo of the face of a {occupation}, a person"

# Group word that replaces "person" in an explicit prompt, per attribute and class (the paper's classes).
GROUP_WORDS: dict[str, dict[str, str]] = {
    "gender": {"male": "male", "female": "female"},
    "race": {"White": "White", "Black": "Black", "Indian": "Indian", "Asian": "Asian"},
}


@dataclass
class PromptConfig:
    """Which prompts to audit. Either a template filled with occupations, or an explicit list of prompts."""

    template: str = option(PAPER_TEMPLATE, help="neutral prompt template with an {occupation} placeholder")
    occupations: list[str] = option(default_factory=list, help="occupations filled into the template")
    occupations_file: str | None = option(None, help="YAML file with an `occupations:` list (e.g. configs/prompts/)")
    prompts: list[str] = option(default_factory=list, help="literal prompts, audited as given (no template)")
    limit: int | None = option(None, help="use only the first N occupations (quick runs)")
    neutral_word: str = option("person", help="final word of the template that explicit variants replace")
    prompt_sets: list[Any] = option(
        default_factory=list,
        help="tagged prompt-set files audited after the prompts above; their tags (region, income, language, ...) "
             "give per-group tables: a path, or {file, select: {tag: [values]}} (see audit/groups.py)",
    )

    def __post_init__(self):
        if (self.occupations or self.occupations_file) and "{occupation}" not in self.template:
            raise ConfigError(
                f"config key 'prompts.template': {self.template!r} has no '{{occupation}}' placeholder; "
                f"write it like {PAPER_TEMPLATE!r}"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config key 'prompts.limit': must be >= 1, got {self.limit}")
        # Validate the references now (files are read when prompts are needed, like occupations_file).
        self.prompt_sets = [_prompt_set_ref(ref, i) for i, ref in enumerate(self.prompt_sets)]

    def occupation_list(self) -> list[str]:
        """Occupations from the config and the file, in order, de-duplicated, cut to ``limit``."""
        occ = list(self.occupations)
        if self.occupations_file:
            data = load_yaml(project_path(self.occupations_file))
            if not isinstance(data.get("occupations"), list):
                raise ConfigError(
                    f"config key 'prompts.occupations_file': {self.occupations_file} has no `occupations:` list"
                )
            occ += [str(o) for o in data["occupations"]]
        occ = list(dict.fromkeys(occ))
        return occ[: self.limit] if self.limit else occ

    def neutral_prompts(self) -> list[str]:
        """The prompts to audit: the template filled with each occupation, the literal prompts, then the prompts of
        every prompt set."""
        out = [self.template.format(occupation=o) for o in self.occupation_list()] + list(self.prompts)
        out += [p for pset in self._loaded_sets() for p in (tp.prompt for tp in pset.prompts)]
        if not out:
            raise ConfigError(
                "config section 'prompts' gives no prompts; set `occupations`, `occupations_file`, `prompts` or "
                "`prompt_sets`"
            )
        out = list(dict.fromkeys(out))
        return out[: self.limit] if self.limit else out

    def _loaded_sets(self) -> list:
        from audit.groups import load_prompt_set

        return [load_prompt_set(ref) for ref in self.prompt_sets]

    def prompt_tags(self) -> dict[str, dict[str, str]]:
        """Group tags of the audited prompts that come from prompt sets (prompt -> {tag: value}).

        A prompt listed by several sets gets the union of their tags.

        Raises:
            ConfigError: if two sets give the same prompt different values of one tag.
        """
        audited = set(self.neutral_prompts())
        tags: dict[str, dict[str, str]] = {}
        for pset in self._loaded_sets():
            for tp in pset.prompts:
                if tp.prompt not in audited:
                    continue
                merged = tags.setdefault(tp.prompt, {})
                for k, v in tp.tags.items():
                    if merged.get(k, v) != v:
                        raise ConfigError(f"config key 'prompts.prompt_sets': prompt {tp.prompt!r} is tagged "
                                          f"{k}={merged[k]!r} by one set and {k}={v!r} by {pset.source}")
                    merged[k] = v
        return tags

    def group_axes(self) -> list[str]:
        """The group axes the prompt sets declare (their ``axes:``), in order, without repeats."""
        return list(dict.fromkeys(a for pset in self._loaded_sets() for a in pset.axes))


def _prompt_set_ref(ref: Any, i: int):
    from audit.groups import PromptSetRef

    if isinstance(ref, PromptSetRef):
        return ref
    if isinstance(ref, str) and ref.strip():
        return PromptSetRef(file=ref)
    if isinstance(ref, dict):
        return from_dict(PromptSetRef, ref, prefix=f"prompts.prompt_sets[{i}]")
    raise ConfigError(f"config key 'prompts.prompt_sets[{i}]': expected a prompt-set file path or "
                      f"{{file: ..., select: {{tag: [values]}}}}, got {ref!r}")


def explicit_prompt(neutral: str, group_word: str, neutral_word: str = "person") -> str:
    """Replace the last ``neutral_word`` of ``neutral`` with ``group_word`` (``..., a person`` -> ``..., a female``)."""
    head, sep, tail = neutral.rpartition(neutral_word)
    if not sep:
        raise ConfigError(
            f"prompt {neutral!r} has no word {neutral_word!r} to replace with a group word; "
            "end the template with ', a person' or set prompts.neutral_word"
        )
    return f"{head}{group_word}{tail}"


def groups(attribute: str, words: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Class -> group word for ``gender``, ``race`` or ``gender_race`` (``"Black female"``; 8 cells)."""
    words = words or GROUP_WORDS
    if attribute == "gender_race":
        return {f"{g}|{r}": f"{rw} {gw}" for (g, gw), (r, rw) in
                itertools.product(words["gender"].items(), words["race"].items())}
    if attribute not in words:
        raise ConfigError(f"unknown attribute '{attribute}'; known: {', '.join([*words, 'gender_race'])}")
    return dict(words[attribute])
