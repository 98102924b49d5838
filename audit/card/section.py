"""The card as a report section (HTML and Markdown from the ``card.*.j2`` templates), and rebuilding the saved
sections of a finished audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from audit.card.config import FILENAME
from audit.groups import groups_section
from audit.report import Section, render_html, render_markdown


def card_section(card: Mapping[str, Any], check: Mapping[str, Any] | None = None) -> Section:
    """The report section of the card (warnings first).

    Args:
        card: The output of :func:`audit.card.build_card`.
        check: The output of :func:`audit.card.check_card`, or None to show the card alone.

    Returns:
        An :class:`audit.report.Section`.
    """
    rep = card.get("representation") or {}
    sets = rep.get("sets") or {}
    context = {
        "card": card, "check": check, "warnings": (check or {}).get("warnings") or [],
        "flags": card.get("flags") or [], "sets": sets, "prompts": rep.get("prompts") or ["?", "?"],
        "attrs": list(rep.get("max_head_deviation") or {}), "assoc": card.get("association") or {},
        "acc": card.get("accuracy") or {}, "comp": card.get("compositional") or {},
        "threshold": next(iter(sets.values()), {}).get("abstain_threshold"),
    }
    # A section body ends without a newline: the page template spaces the sections.
    markdown = render_markdown("card.md.j2", **context).removesuffix("\n")
    return Section(title="Classifier bias card", html=render_html("card.html.j2", **context), markdown=markdown,
                   anchor="classifier-card")


def saved_sections(run_dir: str | Path) -> list[Section]:
    """The card and per-group sections of a finished audit, rebuilt from its files (for re-rendering a report).

    Example: ``write_report_from_run(run, saved_sections(run))``.

    Args:
        run_dir: The run folder (reads ``classifier_card.json`` and the ``groups`` block of ``metrics.json``).

    Returns:
        The sections that exist, card first.
    """
    run_dir = Path(run_dir)
    sections = []
    card_path = run_dir / FILENAME
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        sections.append(card_section(card, card.get("check")))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        groups = json.loads(metrics_path.read_text()).get("groups")
        if groups:
            sections.append(groups_section(groups))
    return sections
