"""Group axes of an audit (region, income, language, ...): tagged prompt sets, per-group tables and disparity.

A *prompt set* is a YAML file whose prompts carry *tags* (``region: Africa``, ``income: Level 2``,
``language: zh``, ...). The audit measures every prompt as usual; this module then aggregates the per-prompt
numbers by the value of one tag (a *group axis*) and reports, per axis and metric:

* the group mean (mean over the group's prompts, prompts without a defined value left out and counted), with a
  percentile bootstrap interval over the group's prompts;
* the *disparity* ``max - min`` over groups of the group means, with a bootstrap interval (prompts resampled
  within every group independently). Disparity is always **lower is better** (0: every group gets the same
  number). The group mean keeps the metric's own direction (RD, no-face rate: lower is better; CLIP score:
  higher is better; a class share: no direction, judge it against the target), which names the *worst* group.
  ``max - min`` of noisy means is biased upwards with few images per prompt: read it with its interval.

Prompt-set file format (see ``configs/prompts/cultural-occupations.yaml``)::

    axes: [region]                 # tags tabulated as group axes (other tags are kept, e.g. to match languages)
    tags: {set: cultural}          # optional: tags of every prompt in the file
    templates:                     # one or more; "{slot}" placeholders; a mapping adds tags to its prompts
      - "A photo of the face of a {occupation} in {country}, a person"
      - {template: "a family home in {country}", subject: home}
    slots:                         # values filled into the templates (product over the slots a template uses)
      occupation: [doctor, nurse]  # a plain value is its own tag: occupation=doctor
      country:
        - {text: Nigeria, region: Africa}            # extra keys are tags of the prompts using this value
        - {text: 医生, tag: doctor}                   # 'tag' sets the slot's tag value (default: text)
    prompts:                       # optional literal prompts with tags
      - {prompt: "a street market in Lagos", region: Africa}
    neutral_word: person           # informational: the word explicit variants replace in this language

Data shipped here (and as prompt sets in ``configs/prompts/``):

* :data:`GEODE_REGIONS`: the six GeoDE regions (Ramaswamy et al., 2023, "GeoDE: a Geographically Diverse
  Evaluation Dataset for Object Recognition") with three example countries each, as in the country prompts of
  DIG In (Hall et al., 2023, facebookresearch/DIG-In ``geode_prompts_countries_fulldataset.csv``).
* :data:`DOLLAR_STREET_INCOME_BINS`: the four income levels Dollar Street (Gapminder) sorts homes by, in 2011 PPP
  dollars per person: Level 1 below $2 a day, Level 2 $2-8, Level 3 $8-32, Level 4 above $32 a day; written as
  monthly amounts (x 30 days: $60, $240, $960), since Dollar Street states income per month.
"""

from __future__ import annotations

import functools
import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from generators.config import ConfigError, UserError, did_you_mean, from_dict, load_yaml, option

# -------------------------------------------------------------------------------------------------------- data

GEODE_REGIONS: dict[str, list[str]] = {
    "Africa": ["Nigeria", "South Africa", "Egypt"],
    "Americas": ["Mexico", "Colombia", "Argentina"],
    "East Asia": ["Japan", "South Korea", "China"],
    "Europe": ["Italy", "Spain", "the United Kingdom"],
    "Southeast Asia": ["Indonesia", "the Philippines", "Thailand"],
    "West Asia": ["Turkey", "the United Arab Emirates", "Saudi Arabia"],
}


@dataclass(frozen=True)
class IncomeBin:
    """One Dollar Street income level.

    Attributes:
        name: Group label used as the ``income`` tag.
        low: Lower bound in US dollars per month (2011 PPP), inclusive; None for the lowest bin.
        high: Upper bound in US dollars per month, exclusive; None for the highest bin.
        text: How the bin is written in prompts.
    """

    name: str
    low: float | None
    high: float | None
    text: str


DOLLAR_STREET_INCOME_BINS: tuple[IncomeBin, ...] = (
    IncomeBin("Level 1 (< $60/month)", None, 60, "less than 60 US dollars"),
    IncomeBin("Level 2 ($60-240/month)", 60, 240, "60 to 240 US dollars"),
    IncomeBin("Level 3 ($240-960/month)", 240, 960, "240 to 960 US dollars"),
    IncomeBin("Level 4 (> $960/month)", 960, None, "more than 960 US dollars"),
)


def income_bin(monthly_usd: float) -> IncomeBin:
    """The Dollar Street income level of a monthly income per person (2011 PPP US dollars).

    Args:
        monthly_usd: Income per person per month, >= 0.

    Returns:
        The :class:`IncomeBin` whose ``[low, high)`` range holds it.

    Raises:
        UserError: for a negative or non-finite income.
    """
    if isinstance(monthly_usd, bool) or not isinstance(monthly_usd, (int, float)) or not np.isfinite(monthly_usd) \
            or monthly_usd < 0:
        raise UserError(f"monthly_usd: expected a non-negative number of dollars per month, got {monthly_usd!r}")
    for b in DOLLAR_STREET_INCOME_BINS:
        if (b.low is None or monthly_usd >= b.low) and (b.high is None or monthly_usd < b.high):
            return b
    raise AssertionError("income bins cover [0, inf)")  # pragma: no cover


# ------------------------------------------------------------------------------------------------- prompt sets


@dataclass
class PromptSetRef:
    """A tagged prompt-set file used by an audit, optionally reduced to some tag values."""

    file: str = option(help="YAML prompt-set file (e.g. configs/prompts/cultural-occupations.yaml)")
    select: dict[str, list[str]] = option(
        default_factory=dict,
        help="keep only prompts whose tag has one of these values, e.g. {occupation: [doctor], region: [Africa]}",
    )


@dataclass(frozen=True)
class TaggedPrompt:
    """A prompt and its group tags."""

    prompt: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PromptSet:
    """The expanded prompts of one prompt-set file.

    Attributes:
        prompts: Prompts in file order (templates in order, slots varying last-slot-fastest), de-duplicated.
        axes: Tags the file declares as group axes.
        source: Where the set came from (for messages).
    """

    prompts: list[TaggedPrompt]
    axes: list[str]
    source: str


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _str_tags(mapping: Mapping[str, Any], where: str, skip: Sequence[str] = ()) -> dict[str, str]:
    out = {}
    for k, v in mapping.items():
        if k in skip:
            continue
        if not isinstance(k, str) or not _FIELD.match(k):
            raise ConfigError(f"{where}: tag name {k!r} must be a word (letters, digits, _)")
        if isinstance(v, (dict, list)) or v is None:
            raise ConfigError(f"{where}: tag '{k}' must be a single value, got {v!r}")
        out[k] = str(v)
    return out


def _template_slots(template: str, where: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{where}: {template!r} is not a valid template ({err}); write slots as {{name}}") from None
    for name in names:
        if not _FIELD.match(name):
            raise ConfigError(f"{where}: placeholder {{{name}}} in {template!r} must be a plain slot name")
    return list(dict.fromkeys(names))


def expand_prompt_set(data: Mapping[str, Any], source: str = "prompt set") -> PromptSet:
    """Expand a prompt-set mapping (the content of a prompt-set YAML file) into tagged prompts.

    Args:
        data: The mapping (see the module docstring for its keys).
        source: Name used in error messages (usually the file path).

    Returns:
        The :class:`PromptSet`.

    Raises:
        ConfigError: for unknown keys, templates using undefined slots, malformed values or tags, tags that
            disagree for the same prompt, or no prompts at all.
    """
    known = {"name", "description", "axes", "tags", "templates", "slots", "prompts", "neutral_word"}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with templates/slots or prompts, got {type(data).__name__}")
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{key}'{did_you_mean(str(key), known)}; "
                              f"known keys: {', '.join(sorted(known))}")
    axes = data.get("axes") or []
    if not isinstance(axes, list) or not all(isinstance(a, str) and _FIELD.match(a) for a in axes):
        raise ConfigError(f"{source}: 'axes' must be a list of tag names, got {axes!r}")
    base = _str_tags(data.get("tags") or {}, f"{source}: tags")
    slots_raw = data.get("slots") or {}
    if not isinstance(slots_raw, Mapping):
        raise ConfigError(f"{source}: 'slots' must map slot names to lists of values, got {slots_raw!r}")
    slots: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for name, values in slots_raw.items():
        where = f"{source}: slots.{name}"
        if not isinstance(name, str) or not _FIELD.match(name):
            raise ConfigError(f"{where}: slot names must be words")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of values")
        parsed = []
        for i, v in enumerate(values):
            if isinstance(v, Mapping):
                if not isinstance(v.get("text"), str) or not v["text"].strip():
                    raise ConfigError(f"{where}[{i}]: a value mapping needs a non-empty 'text', got {dict(v)!r}")
                tags = _str_tags(v, f"{where}[{i}]", skip=("text", "tag"))
                tags[name] = str(v.get("tag", v["text"]))
                parsed.append((v["text"], tags))
            elif isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
                parsed.append((str(v), {name: str(v)}))
            else:
                raise ConfigError(f"{where}[{i}]: expected text or {{text: ..., <tag>: ...}}, got {v!r}")
        slots[name] = parsed
    out: dict[str, dict[str, str]] = {}

    def add(prompt: str, tags: dict[str, str], where: str) -> None:
        if prompt in out:
            for k, v in tags.items():
                if out[prompt].get(k, v) != v:
                    raise ConfigError(f"{where}: prompt {prompt!r} is tagged {k}={out[prompt][k]!r} and {k}={v!r}; "
                                      "give each prompt one value per tag")
            out[prompt].update(tags)
        else:
            out[prompt] = dict(tags)

    templates = data.get("templates") or []
    if not isinstance(templates, list):
        raise ConfigError(f"{source}: 'templates' must be a list, got {templates!r}")
    for t, entry in enumerate(templates):
        where = f"{source}: templates[{t}]"
        if isinstance(entry, Mapping):
            template = entry.get("template")
            extra = _str_tags(entry, where, skip=("template",))
        else:
            template, extra = entry, {}
        if not isinstance(template, str) or not template.strip():
            raise ConfigError(f"{where}: expected a template string, got {entry!r}")
        names = _template_slots(template, where)
        missing = [n for n in names if n not in slots]
        if missing:
            raise ConfigError(f"{where}: placeholder {{{missing[0]}}} has no slot{did_you_mean(missing[0], slots)}; "
                              f"slots: {', '.join(slots) or 'none'}")
        for combo in itertools.product(*(slots[n] for n in names)):
            tags = {**base, **extra}
            for _, value_tags in combo:
                tags.update(value_tags)
            add(template.format(**{n: text for n, (text, _) in zip(names, combo)}), tags, where)
    literal = data.get("prompts") or []
    if not isinstance(literal, list):
        raise ConfigError(f"{source}: 'prompts' must be a list, got {literal!r}")
    for i, entry in enumerate(literal):
        where = f"{source}: prompts[{i}]"
        if isinstance(entry, str):
            prompt, tags = entry, {}
        elif isinstance(entry, Mapping) and isinstance(entry.get("prompt"), str):
            prompt, tags = entry["prompt"], _str_tags(entry, where, skip=("prompt",))
        else:
            raise ConfigError(f"{where}: expected a prompt text or {{prompt: ..., <tag>: ...}}, got {entry!r}")
        if not prompt.strip():
            raise ConfigError(f"{where}: empty prompt")
        add(prompt, {**base, **tags}, where)
    if not out:
        raise ConfigError(f"{source}: gives no prompts; add templates with slots, or prompts")
    return PromptSet([TaggedPrompt(p, t) for p, t in out.items()], list(axes), source)


@functools.lru_cache(maxsize=64)
def _expand_file(path: str, mtime_ns: int, source: str) -> PromptSet:
    # Cached by path and modification time: a config asks for its prompts several times per audit.
    return expand_prompt_set(load_yaml(path), source=source)


def load_prompt_set(ref: str | Path | PromptSetRef | Mapping[str, Any]) -> PromptSet:
    """Read a prompt-set file (path relative to the working directory or the project root) and apply ``select``.

    Args:
        ref: A path, a :class:`PromptSetRef`, or a mapping with its fields (``file``, ``select``).

    Returns:
        The :class:`PromptSet`, reduced to the selected tag values.

    Raises:
        ConfigError: for a missing or malformed file, or a ``select`` that names an unknown tag or value, or keeps
            no prompt.
    """
    from generators.resources import project_path

    if isinstance(ref, Mapping):
        ref = from_dict(PromptSetRef, dict(ref), prefix="prompts.prompt_sets[]")
    elif not isinstance(ref, PromptSetRef):
        ref = PromptSetRef(file=str(ref))
    path = project_path(ref.file)
    pset = _expand_file(str(path), path.stat().st_mtime_ns if path.is_file() else 0, str(ref.file))
    prompts = pset.prompts
    for tag, values in ref.select.items():
        present = {p.tags[tag] for p in prompts if tag in p.tags}
        if not present:
            known = sorted({k for p in pset.prompts for k in p.tags})
            raise ConfigError(f"prompt set '{ref.file}': select key '{tag}' is not a tag of its prompts"
                              f"{did_you_mean(tag, known)}; tags: {', '.join(known)}")
        unknown = [v for v in values if v not in present]
        if unknown:
            raise ConfigError(f"prompt set '{ref.file}': select {tag}={unknown[0]!r} matches no prompt"
                              f"{did_you_mean(unknown[0], present)}; values: {', '.join(sorted(present))}")
        prompts = [p for p in prompts if p.tags.get(tag) in set(values)]
    if not prompts:
        raise ConfigError(f"prompt set '{ref.file}': select {ref.select} keeps no prompt")
    return PromptSet(prompts, pset.axes, pset.source)


# ------------------------------------------------------------------------------------------ per-group numbers


def group_values(values: Mapping[str, float | None], tags: Mapping[str, Mapping[str, str]], axis: str
                 ) -> dict[str, list[float]]:
    """Per-prompt values grouped by the value of tag ``axis``; undefined values (None, NaN) are left out.

    Args:
        values: Prompt -> number (or None when undefined, e.g. a prompt without a classified face).
        tags: Prompt -> its tags.
        axis: The tag to group by.

    Returns:
        Group -> the defined values of its prompts, groups in order of first appearance in ``values``.
        A group whose prompts are all undefined maps to an empty list (it still shows up).
    """
    out: dict[str, list[float]] = {}
    for prompt, v in values.items():
        group = (tags.get(prompt) or {}).get(axis)
        if group is None:
            continue
        out.setdefault(group, [])
        if v is not None and np.isfinite(v):
            out[group].append(float(v))
    return out


def disparity(means: Mapping[str, float | None], lower_is_better: bool | None = True) -> dict[str, Any]:
    """Disparity across groups: ``max - min`` of the group means (lower is better; 0 = parity).

    Args:
        means: Group -> mean (None or NaN when undefined; left out).
        lower_is_better: Direction of the metric itself, to name the worst and best group (None: no direction).

    Returns:
        ``disparity``, ``max_group``, ``min_group`` (the first such group), ``worst_group`` and ``best_group``
        (every group at that extreme, joined by ", "; None without a direction or when all groups are equal) and
        ``n_groups`` (defined groups); ``disparity`` is None with fewer than two defined groups.
    """
    defined = {g: float(m) for g, m in means.items() if m is not None and np.isfinite(m)}
    if len(defined) < 2:
        return {"disparity": None, "max_group": None, "min_group": None, "worst_group": None, "best_group": None,
                "n_groups": len(defined), "lower_is_better": True}
    hi = max(defined, key=lambda g: defined[g])
    lo = min(defined, key=lambda g: defined[g])
    # With a direction, the worst group is the one the direction disfavours; on a tie there is none.
    tie = defined[hi] == defined[lo]
    tops = ", ".join(g for g, v in defined.items() if v == defined[hi])
    bottoms = ", ".join(g for g, v in defined.items() if v == defined[lo])
    worst = None if lower_is_better is None or tie else (tops if lower_is_better else bottoms)
    best = None if lower_is_better is None or tie else (bottoms if lower_is_better else tops)
    return {"disparity": defined[hi] - defined[lo], "max_group": hi, "min_group": lo, "worst_group": worst,
            "best_group": best, "n_groups": len(defined), "lower_is_better": True}


def group_summary(values: Mapping[str, float | None], tags: Mapping[str, Mapping[str, str]], axis: str, *,
                  lower_is_better: bool | None = True, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0
                  ) -> dict[str, Any]:
    """Group means with intervals and the disparity ``max - min`` with its interval, for one metric and axis.

    Intervals are percentile bootstraps: prompts are resampled with replacement within each group, independently
    across groups, and the group means and ``max - min`` recomputed per replicate. A group needs at least two
    prompts for an interval (``ci`` None otherwise), and ``disparity_ci`` needs every group to have two.

    Args:
        values: Prompt -> per-prompt value (None when undefined).
        tags: Prompt -> tags.
        axis: Tag to group by.
        lower_is_better: Direction of the metric (names the worst group; disparity itself is lower-is-better).
        alpha: 1 - confidence level.
        n_boot: Bootstrap replicates.
        seed: Bootstrap seed.

    Returns:
        ``per_group`` (group -> ``mean``, ``ci``, ``n_prompts`` defined, ``n_undefined``), ``disparity``,
        ``disparity_ci`` and the fields of :func:`disparity`.

    Raises:
        UserError: for ``alpha`` outside (0, 1) or ``n_boot`` < 1.
    """
    from audit.metrics import _check_alpha, _check_n_boot, bootstrap_mean, percentile_ci

    _check_alpha(alpha)
    _check_n_boot(n_boot)
    grouped = group_values(values, tags, axis)
    totals: dict[str, int] = {}
    for prompt in values:
        g = (tags.get(prompt) or {}).get(axis)
        if g is not None:
            totals[g] = totals.get(g, 0) + 1
    rng = np.random.default_rng(seed)
    per_group: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for g, vals in grouped.items():
        mean, ci = None, None
        if vals:
            # Groups draw one after the other from the same stream, so the disparity sees independent groups.
            mean, interval, boots[g] = bootstrap_mean(vals, alpha, n_boot, rng)
            # One prompt gives no spread to resample: no interval rather than a falsely exact one.
            ci = list(interval) if len(vals) >= 2 else None
        per_group[g] = {"mean": mean, "ci": ci, "n_prompts": len(vals), "n_undefined": totals.get(g, 0) - len(vals)}
    result = {"per_group": per_group, **disparity({g: v["mean"] for g, v in per_group.items()}, lower_is_better)}
    result["metric_lower_is_better"] = lower_is_better
    if len(boots) >= 2 and all(v["n_prompts"] >= 2 for v in per_group.values() if v["n_prompts"]):
        stacked = np.stack(list(boots.values()))
        d = stacked.max(axis=0) - stacked.min(axis=0)
        result["disparity_ci"] = list(percentile_ci(d, alpha))
    else:
        result["disparity_ci"] = None
    return result


def side_by_side(values: Mapping[str, float | None], tags: Mapping[str, Mapping[str, str]], axis: str = "language",
                 key: str = "occupation") -> dict[str, Any]:
    """A matched table: one row per value of tag ``key`` (e.g. occupation), one column per value of ``axis``.

    Used to compare languages prompt by prompt: ``A photo of the face of a doctor, a person`` (en) and
    ``一张医生的脸部照片，一个人`` (zh) share ``occupation: doctor``.

    Args:
        values: Prompt -> per-prompt value (None when undefined).
        tags: Prompt -> tags.
        axis: Column tag.
        key: Row tag.

    Returns:
        ``columns`` (axis values), ``rows`` (``key`` value -> {column: value or None}), and ``complete`` (rows
        defined in every column), in order of first appearance. Two prompts with the same row and column are
        averaged.
    """
    columns: list[str] = []
    cells: dict[str, dict[str, list[float]]] = {}
    for prompt, v in values.items():
        t = tags.get(prompt) or {}
        if axis not in t or key not in t:
            continue
        if t[axis] not in columns:
            columns.append(t[axis])
        row = cells.setdefault(t[key], {})
        if v is not None and np.isfinite(v):
            row.setdefault(t[axis], []).append(float(v))
    rows = {r: {c: (float(np.mean(cols[c])) if cols.get(c) else None) for c in columns} for r, cols in cells.items()}
    complete = [r for r, vals in rows.items() if all(vals[c] is not None for c in columns)]
    return {"axis": axis, "key": key, "columns": columns, "rows": rows, "complete": complete}


# ------------------------------------------------------------------------------------ from an audit's metrics


def per_prompt_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-prompt numbers of an audit that groups are compared on.

    Args:
        metrics: The dict of ``metrics.json`` (``attributes`` and optional ``quality``).

    Returns:
        Metric key -> ``label``, ``lower_is_better`` (True, False, or None for no direction) and ``values``
        (prompt -> number or None). Keys: ``rd.<attribute>`` for every attribute (joint ones too),
        ``share.<attribute>.<class>`` (hard share) for every simple attribute, ``no_face_rate`` and ``clip_score``.
    """
    out: dict[str, dict[str, Any]] = {}
    attributes = metrics.get("attributes") or {}
    for name, a in attributes.items():
        pp = a.get("per_prompt") or []
        out[f"rd.{name}"] = {"label": f"{name.replace('_', ' × ')} RD", "lower_is_better": True,
                             "values": {p["prompt"]: p.get("rd") for p in pp}}
    from audit.report import joint_parts

    for name, a in attributes.items():
        classes = a.get("classes") or []
        if joint_parts(name, attributes) is not None:  # joint cells: covered by the simple attributes' shares
            continue
        pp = a.get("per_prompt") or []
        for j, c in enumerate(classes):
            out[f"share.{name}.{c}"] = {
                "label": f"share {c} ({name})", "lower_is_better": None,
                "values": {p["prompt"]: (p["shares"][j] if p.get("shares") and p["shares"][j] is not None else None)
                           for p in pp}}
    if attributes:
        first = next(iter(attributes.values()))
        out["no_face_rate"] = {"label": "no-face rate", "lower_is_better": True,
                               "values": {p["prompt"]: p.get("no_face_rate") for p in first.get("per_prompt") or []}}
    quality = metrics.get("quality") or {}
    if quality.get("per_prompt"):
        out["clip_score"] = {"label": "CLIP score", "lower_is_better": False, "values": dict(quality["per_prompt"])}
    return out


def group_report(metrics: Mapping[str, Any], tags: Mapping[str, Mapping[str, str]], axes: Sequence[str] | None = None,
                 *, alpha: float = 0.05, n_boot: int = 1000, seed: int = 0, match_key: str = "occupation",
                 split_by: str = "subject") -> dict[str, Any] | None:
    """Per-group tables of an audit for every group axis (region, income, language, ...).

    Args:
        metrics: The dict of ``metrics.json``.
        tags: Prompt -> tags (from the prompt sets; see :meth:`audit.prompts.PromptConfig.prompt_tags`).
        axes: Tags to tabulate; default: every tag with at least two values among the audited prompts.
        alpha: 1 - confidence level of the intervals.
        n_boot: Bootstrap replicates.
        seed: Bootstrap seed.
        match_key: Tag matching prompts across ``language`` groups in the side-by-side table.
        split_by: When an axis's prompts carry this tag with several values (``subject: home`` / ``person`` in
            ``income-homes.yaml``), the axis is tabulated once per value, so person-free prompts never mix with
            face prompts in one group mean. Its table is named ``"<axis> (<split_by>: <value>)"``.

    Returns:
        None when no audited prompt has a tag on any axis; else ``axes`` (table name -> ``axis``, ``filter``,
        ``groups``, ``n_prompts`` per group and ``metrics``: metric key -> :func:`group_summary` result plus
        ``label``), ``n_untagged`` and, when a ``language`` axis is present, ``side_by_side`` (metric key ->
        :func:`side_by_side` table for the RD of every attribute).
    """
    per_metric = per_prompt_metrics(metrics)
    prompts = list(next(iter(per_metric.values()))["values"]) if per_metric else []
    audited = {p: dict(tags[p]) for p in prompts if p in tags}
    if not audited:
        return None
    if axes is None:
        counts: dict[str, set] = {}
        for t in audited.values():
            for k, v in t.items():
                counts.setdefault(k, set()).add(v)
        axes = [k for k, vals in counts.items() if len(vals) >= 2 and k != split_by]
    result: dict[str, Any] = {"axes": {}, "n_untagged": len(prompts) - len(audited), "alpha": alpha,
                              "n_boot": n_boot, "definition": "disparity = max - min over groups of the group "
                              "means (lower is better); group mean = mean over the group's prompts"}
    for axis in axes:
        if axis == split_by:
            continue
        present = [p for p in prompts if axis in audited.get(p, {})]
        if not present:
            continue
        parts = list(dict.fromkeys(audited[p].get(split_by) for p in present))
        tables = [(f"{axis} ({split_by}: {v})", v) for v in parts] if len(parts) >= 2 else [(axis, None)]
        for name, value in tables:
            keep = [p for p in present if value is None or audited[p].get(split_by) == value]
            sub = {p: audited[p] for p in keep}
            groups = list(dict.fromkeys(sub[p][axis] for p in keep))
            block: dict[str, Any] = {"axis": axis, "filter": {split_by: value} if value is not None else {},
                                     "groups": groups,
                                     "n_prompts": {g: sum(sub[p][axis] == g for p in keep) for g in groups},
                                     "metrics": {}}
            for key, m in per_metric.items():
                summary = group_summary(m["values"], sub, axis, lower_is_better=m["lower_is_better"], alpha=alpha,
                                        n_boot=n_boot, seed=seed)
                block["metrics"][key] = {"label": m["label"], **summary}
            result["axes"][name] = block
    if any(block["axis"] == "language" for block in result["axes"].values()):
        result["side_by_side"] = {key: {"label": m["label"], **side_by_side(m["values"], audited, "language",
                                                                             match_key)}
                                  for key, m in per_metric.items() if key.startswith("rd.")}
    return result


# ------------------------------------------------------------------------------------------------------ report


def _metric_order(keys: Sequence[str]) -> list[str]:
    rank = {"rd": 0, "no_face_rate": 1, "clip_score": 2, "share": 3}
    return sorted(keys, key=lambda k: (rank.get(k.split(".")[0], 4), list(keys).index(k)))


_GROUP_TABLE = """
<h3 id="groups-{{ name | slug }}">{{ title }}</h3>
<div style="overflow-x:auto"><table><thead><tr><th>{{ axis }}</th><th class="num">Prompts</th>
{% for c in cols %}<th class="num">{{ c.label }} <span class="dir">{{ c.arrow }}</span></th>{% endfor %}</tr></thead>
<tbody>
{% for g in groups %}
<tr><td>{{ g }}</td><td class="num">{{ n[g] }}</td>
  {% for c in cols %}{% set v = c.per_group.get(g, {}) %}
  <td class="num">{{ v.mean | num }}<span class="ci">{{ v.ci | ci }}</span></td>{% endfor %}</tr>
{% endfor %}
<tr style="border-top:2px solid #cbd2d9"><td><b>Disparity (max − min)</b> <span class="dir">↓</span></td><td></td>
  {% for c in cols %}
  <td class="num"><b>{{ c.disparity | num }}</b><span class="ci">{{ c.disparity_ci | ci }}</span></td>{% endfor %}</tr>
<tr><td>Worst group</td><td></td>
  {% for c in cols %}<td class="num small">{{ c.worst_group or "—" }}</td>{% endfor %}</tr>
</tbody></table></div>
"""


def _columns(block: Mapping[str, Any], shares: bool) -> list[dict[str, Any]]:
    cols = []
    for key in _metric_order(list(block["metrics"])):
        if key.startswith("share.") != shares:
            continue
        m = block["metrics"][key]
        lib = m.get("metric_lower_is_better")
        cols.append({**m, "arrow": "↓" if lib else ("↑" if lib is False else "·")})
    return cols


def groups_section(result: Mapping[str, Any]):
    """The report section: one table per group axis (groups as rows, metrics as columns, disparity as the last
    row), class shares per group in a collapsed table, and the languages side by side.

    Args:
        result: The output of :func:`group_report`.

    Returns:
        An :class:`audit.report.Section` (HTML built with autoescaping; Markdown escaped).
    """
    from audit.report import Section, fmt_ci, fmt_num, html_fragment, md_escape

    conf = int(round((1 - result.get("alpha", 0.05)) * 100))
    html_parts = [html_fragment(
        "<p class=\"note\">Per-prompt numbers averaged over the prompts of each group ({{ conf }}% bootstrap "
        "intervals over prompts; a group needs two prompts for an interval). <b>Disparity = max − min</b> over "
        "groups of the group means: <b>lower is better</b> (0 = every group gets the same number). The arrow after a "
        "metric is the direction of the group mean itself (↓ lower is better, ↑ higher is better, · no direction: "
        "compare shares with the target); the worst group follows it.{% if n_untagged %} {{ n_untagged }} audited "
        "prompts carry no group tag and are left out.{% endif %}</p>", conf=conf, n_untagged=result.get("n_untagged"))]
    md_parts = ["Disparity = max − min over groups of the group means (lower is better; 0 = parity)."]
    for name, block in result["axes"].items():
        groups, axis = block["groups"], block.get("axis", name)
        cols = _columns(block, shares=False)
        share_cols = _columns(block, shares=True)
        html_parts.append(html_fragment(_GROUP_TABLE, name=name, title=f"By {name}", axis=axis, groups=groups,
                                        n=block["n_prompts"], cols=cols))
        if share_cols:
            html_parts.append(html_fragment(
                "<details><summary>Class shares by {{ name }}</summary>{{ table }}</details>", name=name,
                table=html_fragment(_GROUP_TABLE, name=name + "-shares", title=f"Class shares by {name}", axis=axis,
                                    groups=groups, n=block["n_prompts"], cols=share_cols)))
        md_parts.append(f"\n**By {md_escape(name)}**\n")
        md_parts.append(f"| {md_escape(axis)} | Prompts | " + " | ".join(f"{md_escape(c['label'])} {c['arrow']}"
                                                                        for c in cols) + " |")
        md_parts.append("|---|--:|" + "--:|" * len(cols))
        for g in groups:
            md_parts.append(f"| {md_escape(g)} | {block['n_prompts'][g]} | "
                            + " | ".join(fmt_num(c["per_group"].get(g, {}).get("mean")) for c in cols) + " |")
        md_parts.append("| **Disparity (max − min) ↓** | | " + " | ".join(
            f"**{fmt_num(c.get('disparity'))}** {fmt_ci(c.get('disparity_ci'))}".strip() for c in cols) + " |")
        worst = " | ".join(md_escape(c.get("worst_group") or "—") for c in cols)
        md_parts.append(f"| Worst group | | {worst} |")
    for key, table in (result.get("side_by_side") or {}).items():
        if not table["rows"]:
            continue
        cols = table["columns"]
        html_parts.append(html_fragment(
            "<h3>{{ label }}: languages side by side</h3><p class=\"note\">One row per {{ key }}, matched across "
            "languages by its tag; prompts are translations of the same prompt set.</p>"
            "<div style=\"overflow-x:auto\"><table><thead><tr><th>{{ key }}</th>{% for c in cols %}"
            "<th class=\"num\">{{ c }}</th>{% endfor %}</tr></thead><tbody>{% for r, vals in rows.items() %}<tr>"
            "<td>{{ r }}</td>{% for c in cols %}<td class=\"num\">{{ vals[c] | num }}</td>{% endfor %}</tr>"
            "{% endfor %}</tbody></table></div>", label=table["label"], key=table["key"], cols=cols,
            rows=table["rows"]))
        md_parts.append(f"\n**{md_escape(table['label'])}: languages side by side**\n")
        md_parts.append(f"| {md_escape(table['key'])} | " + " | ".join(md_escape(c) for c in cols) + " |")
        md_parts.append("|---|" + "--:|" * len(cols))
        for r, vals in table["rows"].items():
            md_parts.append(f"| {md_escape(r)} | " + " | ".join(fmt_num(vals[c]) for c in cols) + " |")
    return Section(title="Groups: region, income, language", html="".join(str(p) for p in html_parts),
                   markdown="\n".join(md_parts), anchor="groups")


__all__ = [
    "DOLLAR_STREET_INCOME_BINS", "GEODE_REGIONS", "IncomeBin", "PromptSet", "PromptSetRef", "TaggedPrompt",
    "disparity", "expand_prompt_set", "group_report", "group_summary", "group_values", "groups_section",
    "income_bin", "load_prompt_set", "per_prompt_metrics", "side_by_side",
]
