"""``report.html``: one page linking every picture and file, with relative links (opened from the prefix)."""

from __future__ import annotations

import html


def render(summary: dict, maps: list[tuple[str, str]], plumes: list[tuple[str, str]], timing: tuple[str, str] | None,
           netcdf: list[str]) -> str:
    esc = html.escape
    used = summary["members_used"]
    rows = [
        ("date", summary["date"]), ("members used", f"{len(used)} of {len(summary['members_selected'])}"
                                    + (" (PARTIAL ensemble)" if summary["partial"] else "")),
        ("submission", summary["submission"]),
    ]
    excluded = "".join(f"<li>member {m}: {esc(why)}</li>" for m, why in summary["members_excluded"].items())
    figs = lambda items: "".join(  # noqa: E731
        f'<figure><a href="{esc(f)}"><img src="{esc(f)}" alt="{esc(t)}" width="720"></a><figcaption>{esc(t)}</figcaption></figure>'
        for t, f in items)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>AIFS-ENS products {esc(summary['date'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{display:inline-block;margin:.5em}} td{{padding:.2em .8em}}</style>
</head><body>
<h1>AIFS-ENS products, {esc(summary['date'])}</h1>
<table>{''.join(f'<tr><th align="left">{esc(k)}</th><td>{esc(str(v))}</td></tr>' for k, v in rows)}</table>
{f'<h3>Members left out</h3><ul>{excluded}</ul>' if excluded else ''}
<h2>Most likely quintile (AI Weather Quest periods)</h2>{figs(maps)}
<h2>Ensemble plumes</h2>{figs(plumes)}
{f'<h2>Run</h2>{figs([timing])}' if timing else ''}
<h2>Files</h2><ul>{''.join(f'<li><a href="{esc(n)}">{esc(n)}</a></li>' for n in netcdf)}</ul>
</body></html>
"""
