"""Report sections of the locate probes (HTML and Markdown from the Jinja2 templates in ``templates/``).

Each ``*_section`` returns an :class:`audit.report.Section`, usable alone (append it to an audit report with
``audit.report.write_report(..., extra_sections=[...])``) or gathered by :func:`write_locate_report` into
``locate.html`` and ``locate.md``. All user and model text (prompts, occupations, answers, class names, paths) is
escaped: HTML by the templates' autoescaping, Markdown by their ``md`` filter (:func:`audit.report.md_escape`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from markupsafe import Markup

from audit.report import Section, render_html, render_markdown, slugify
from audit.store import atomic_write_bytes

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _section(probe: str, title: str, **context: Any) -> Section:
    """A probe's section from its ``<probe>.html.j2`` and ``<probe>.md.j2`` templates, anchored at ``#<probe>``."""
    html = render_html(f"{probe}.html.j2", TEMPLATES, **context)
    # A section body ends without a newline: the report page spaces the sections.
    md = render_markdown(f"{probe}.md.j2", TEMPLATES, **context).removesuffix("\n")
    return Section(title=title, html=html, markdown=md, anchor=probe)


def understanding_section(result: Mapping[str, Any], alignment: Mapping[str, Any] | None = None) -> Section:
    """The understanding probe (and, when given, the partial-alignment table beside the generation audit)."""
    return _section("understanding", "Understanding probe", r=result, align=alignment or {})


def vision_section(result: Mapping[str, Any]) -> Section:
    """The vision-encoder probe: accuracy and macro-F1 per encoder and attribute (and one-vs-one pairs)."""
    return _section("vision", "Vision-encoder probe", r=result)


def controlled_section(result: Mapping[str, Any]) -> Section:
    """The controlled-generation probe: hit rates per distribution and the per-prompt JSD table."""
    return _section("controlled", "Controlled-generation probe", r=result)


def swap_section(result: Mapping[str, Any]) -> Section:
    """The component swap: the 2 x 2 table of RD and the effects with intervals."""
    return _section("swap", "Component swap", r=result)


def render_locate_report(sections: Sequence[Section], title: str, model: str, probes: Sequence[str]
                         ) -> tuple[str, str]:
    """The self-contained ``locate.html`` page and ``locate.md`` text for ``sections``."""
    now = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    items = [{"anchor": s.anchor or slugify(s.title), "title": s.title, "html": Markup(s.html)} for s in sections]
    html = render_html("locate.html.j2", TEMPLATES, title=title, model=model, probes=list(probes),
                       generated=now, nav=[(x["anchor"], x["title"]) for x in items], sections=items)
    md = render_markdown("locate.md.j2", TEMPLATES, title=title, model=model, probes=list(probes), sections=sections)
    return html, md


def write_locate_report(out_dir: str | Path, sections: Sequence[Section], title: str, model: str,
                        probes: Sequence[str]) -> None:
    """Write ``out_dir/locate.html`` and ``out_dir/locate.md`` (both rendered before either is written)."""
    html, md = render_locate_report(sections, title, model, probes)
    atomic_write_bytes(Path(out_dir) / "locate.html", html.encode())
    atomic_write_bytes(Path(out_dir) / "locate.md", md.encode())


SECTIONS = {"understanding": understanding_section, "vision": vision_section, "controlled": controlled_section,
            "swap": swap_section}


def write_probe(out_dir: str | Path, result: Mapping[str, Any], title: str = "", model: str = "") -> Section:
    """Write one probe's result alone: ``<probe>.json``, ``<probe>.html`` and ``<probe>.md`` in ``out_dir``.

    For a probe run from Python, e.g. ``write_probe("out", controlled_probe(...))``.

    Args:
        out_dir: output folder (created).
        result: the dict a probe returned (its ``probe`` key names it).
        title: page title (default: the section title).
        model: model name shown in the page header.

    Returns:
        The report :class:`Section` (to append to another report).
    """
    from audit.store import atomic_write_json
    from generators.config import UserError

    name = result.get("probe") if isinstance(result, Mapping) else None
    if name not in SECTIONS:
        raise UserError(f"write_probe: result has no known 'probe' key ({name!r}); pass a probe's output")
    section = SECTIONS[name](result, result.get("alignment")) if name == "understanding" else SECTIONS[name](result)
    html, md = render_locate_report([section], title or section.title, model or "—", [name])
    out = Path(out_dir)
    atomic_write_json(out / f"{name}.json", result)
    atomic_write_bytes(out / f"{name}.html", html.encode())
    atomic_write_bytes(out / f"{name}.md", md.encode())
    return section
