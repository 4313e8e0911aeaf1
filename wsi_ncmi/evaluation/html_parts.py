"""Building blocks of the self-contained ``report.html`` pages (:mod:`.html_report`).

Everything a page shows is inside the one file: figures are PNG / JPEG data URIs, the CSS and the sorting
script are inline, and a Content-Security-Policy (``default-src 'none'``; images only from ``data:``; the
style and script allowed by their SHA-256) makes the browser refuse any network request the page could make.
Links (``<a href>``) point only to files beside the page (the full-size PNGs, the CSV, other pages).

Every string that comes from a file (slide ids, class names, paths, config text) goes through :func:`esc`;
:class:`Raw` marks the HTML built here, the only text inserted unescaped. Sizes: figures are embedded as PNG,
downscaled to at most :data:`FIGURE_MAX_SIDE` px; heatmap thumbnails as JPEG (quality 80) of at most
:data:`THUMB_MAX_SIDE` px, each linked to its full PNG. The sorting script is a progressive enhancement:
without JavaScript the tables are complete, in file order.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .report_schema import ReportError

__all__ = ["FIGURE_MAX_SIDE", "THUMB_MAX_SIDE", "HtmlReportError", "Raw", "class_name", "details", "esc", "figure",
           "fmt", "heading", "heatmap_gallery", "image_data_uri", "inside", "join", "joined", "key_values", "page",
           "para", "parse_flag", "read_json", "read_results_csv", "rel_link", "related_links", "section_nav", "table",
           "thumbnail_link"]

logger = logging.getLogger(__name__)

FIGURE_MAX_SIDE = 900  # px, longest side of an embedded figure (PNG)
THUMB_MAX_SIDE = 256  # px, longest side of a heatmap thumbnail (JPEG, quality 80)


class Raw(str):
    """HTML built by this module (already escaped): inserted as is."""


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML content and quoted attributes."""
    return html.escape(str(value), quote=True)


def join(parts: Iterable[str]) -> Raw:
    """Concatenate HTML fragments (each must be :class:`Raw`: plain strings are escaped)."""
    return Raw("".join(p if isinstance(p, Raw) else esc(p) for p in parts))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any, spec: str = ".3f") -> str:
    """A cell's text: numbers with ``spec`` (tiny ones with 3 significant digits), "—" for None / NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 0.01 else f"{v:{spec}}"
    return str(v)


def _plain(v: Any) -> Any:
    """numpy scalars as Python values, pandas' NA as None."""
    if type(v).__name__ in ("NAType", "NaTType"):
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    return v


def _cell(tag: str, v: Any) -> str:
    if isinstance(v, Raw):
        return f"<{tag}>{v}</{tag}>"
    v = _plain(v)
    if _is_number(v) and math.isfinite(v):
        return f'<{tag} class="num" data-sort="{float(v)!r}">{esc(fmt(v))}</{tag}>'
    return f"<{tag}>{esc(fmt(v))}</{tag}>"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], *, table_id: str | None = None,
          caption: str | None = None, sortable: bool = True,
          row_classes: Sequence[str | None] | None = None) -> Raw:
    """An HTML table; numeric cells carry ``data-sort`` (so the script sorts them as numbers), :class:`Raw`
    cells are inserted as they are, every other cell is escaped."""
    attrs = f' id="{esc(table_id)}"' if table_id else ""
    cls = ' class="sortable"' if sortable else ""
    out = [f"<div class=\"scroll\"><table{attrs}{cls}>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th scope=\"col\">{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes is not None and i < len(row_classes) else None
        out.append((f'<tr class="{esc(rc)}">' if rc else "<tr>") + "".join(_cell("td", v) for v in row) + "</tr>")
    out.append("</tbody></table></div>")
    return Raw("".join(out))


def key_values(items: Iterable[tuple[str, Any]]) -> Raw:
    """A definition list of ``(name, value)`` pairs (values escaped unless :class:`Raw`; None skipped)."""
    rows = [f"<dt>{esc(k)}</dt><dd>{v if isinstance(v, Raw) else esc(fmt(v))}</dd>"
            for k, v in items if v is not None and v != ""]
    return Raw("<dl>" + "".join(rows) + "</dl>") if rows else Raw("")


def details(summary: str, body: str, open_: bool = False) -> Raw:
    """A collapsible block (readable without JavaScript)."""
    return Raw(f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{join([body])}</details>")


def image_data_uri(path: str | os.PathLike, max_side: int, fmt_: str = "PNG") -> tuple[str, tuple[int, int]] | None:
    """``data:`` URI of the image at ``path`` downscaled to ``max_side`` (``fmt_`` "PNG" or "JPEG") and its size;
    None (logged) when the file cannot be read as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGBA" if fmt_ == "PNG" and "A" in im.getbands() else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        logger.warning("%s: not embedded in the HTML report (%s)", path, err)
        return None
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    if fmt_ == "JPEG":
        img.save(buf, format="JPEG", quality=80, optimize=True)
    else:
        img.save(buf, format="PNG", optimize=True)
    mime = "image/jpeg" if fmt_ == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", img.size


def rel_link(target: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """``target`` relative to the page's folder, as a URL path (escaped by the caller)."""
    from urllib.parse import quote

    rel = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return quote(Path(rel).as_posix())  # '#', '?', ':' in a file name cannot turn the link into a URL


def figure(path: str | os.PathLike, caption: str, page_dir: str | os.PathLike,
           max_side: int = FIGURE_MAX_SIDE) -> Raw:
    """An embedded figure linked to its file, or a one-line note when the file cannot be read."""
    got = image_data_uri(path, max_side)
    if got is None:
        return Raw(f'<p class="note">{esc(caption)}: {esc(Path(path).name)} could not be read</p>')
    uri, (w, h) = got
    href = esc(rel_link(path, page_dir))
    return Raw(f'<figure><a href="{href}"><img src="{uri}" width="{w}" height="{h}" alt="{esc(caption)}"></a>'
               f"<figcaption>{esc(caption)}</figcaption></figure>")


def thumbnail_link(path: str | os.PathLike, caption: str, page_dir: str | os.PathLike,
                   max_side: int = THUMB_MAX_SIDE) -> Raw:
    """A small JPEG thumbnail of ``path`` linked to the full image (a note when it cannot be read)."""
    got = image_data_uri(path, max_side, "JPEG")
    if got is None:
        return Raw(f'<span class="note">{esc(Path(path).name)} could not be read</span>')
    uri, (w, h) = got
    return Raw(f'<a class="thumb" href="{esc(rel_link(path, page_dir))}"><img src="{uri}" width="{w}" '
               f'height="{h}" alt="{esc(caption)}" title="{esc(caption)}"></a>')


# ------------------------------------------------------------------- reading a folder, page sections
class HtmlReportError(ReportError):
    """A folder cannot be rendered (no known result file, unreadable table); the message names the file."""


def heading(level: int, text: str, anchor: str | None = None) -> Raw:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return Raw(f"<h{level}{ident}>{esc(text)}</h{level}>")


def para(text: str, cls: str | None = None) -> Raw:
    return Raw(f'<p class="{esc(cls)}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>")


def inside(folder: Path, name: Any) -> Path | None:
    """``folder/name`` when it is a file inside ``folder`` (names come from files: never follow them out)."""
    if not isinstance(name, str) or not name:
        return None
    p = (folder / name).resolve()
    return p if p.is_file() and p.is_relative_to(folder.resolve()) else None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HtmlReportError(f"{path}: cannot read ({err})") from err
    if not isinstance(data, dict):
        raise HtmlReportError(f"{path}: not a JSON object")
    return data


def read_results_csv(path: Path) -> pd.DataFrame:
    """A results table as text (ids stay ids), with its number-like columns made numbers."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise HtmlReportError(f"{path}: cannot read the table ({err})") from err
    if "slide_id" not in df.columns:
        raise HtmlReportError(f"{path}: no slide_id column (columns: {list(df.columns)})")
    for col in df.columns:
        if col.startswith(("prob_", "ood_", "kl_")) and col != "ood_flag":
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def parse_flag(v: Any) -> bool | None:
    s = str(v).strip().lower()
    return True if s in ("true", "1") else False if s in ("false", "0") else None


def class_name(v: Any, names: Sequence[str]) -> str:
    s = str(v)
    return names[int(s)] if s.isdigit() and int(s) < len(names) else s


def heatmap_gallery(folder: Path) -> list[Raw]:
    pngs = sorted((folder / "heatmaps").rglob("*.png")) if (folder / "heatmaps").is_dir() else []
    if not pngs:
        return []
    cards = [Raw(f"<figure>{thumbnail_link(p, p.stem, folder)}<figcaption>"
                 f"{esc(p.relative_to(folder / 'heatmaps').with_suffix('').as_posix())}</figcaption></figure>")
             for p in pngs]
    return [heading(2, f"Attention heatmaps ({len(pngs)})", "heatmaps"),
            para("Thumbnails; click one for the full image (tiles coloured by the model's attention rank).", "note"),
            Raw('<div class="thumbs">' + "".join(cards) + "</div>")]


def related_links(folder: Path, related: Sequence[Path]) -> list[Raw]:
    pages = [Path(p) for p in related if Path(p).is_file()]
    if not pages:
        return []
    items = "".join(f'<li><a href="{esc(rel_link(p, folder))}">{esc(os.path.relpath(p, folder))}</a></li>'
                    for p in pages)
    return [heading(2, "Related pages", "related"), Raw(f"<ul>{items}</ul>")]


def section_nav(parts: Sequence[Raw]) -> Raw:
    """Links to the page's sections (its ``<h2 id=...>`` headings)."""
    links = [f'<a href="#{a}">{t}</a>' for part in parts for a, t in re.findall(r'<h2 id="([^"]+)">([^<]*)</h2>', part)]
    return Raw("<nav>" + "".join(links) + "</nav>")


def joined(v: Any) -> Any:
    return ", ".join("—" if x is None else str(x) for x in v) if isinstance(v, (list, tuple)) else v


CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d8dce3;--bg2:#f4f6f9;--accent:#2a5db0;--bad:#b3261e;--warn:#fff3cd}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);margin:0 auto;
max-width:1200px;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.55rem;margin:.2rem 0 .4rem}h2{font-size:1.2rem;margin:2rem 0 .6rem;padding-bottom:.2rem;
border-bottom:2px solid var(--line)}h3{font-size:1.02rem;margin:1.2rem 0 .4rem}
p.lead{color:var(--muted);margin:.2rem 0 1rem}.note{color:var(--muted);font-size:.9rem}
nav{font-size:.9rem;margin:.4rem 0 1rem}nav a{margin-right:.9rem}
a{color:var(--accent)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.88rem}
caption{text-align:left;color:var(--muted);padding:.2rem 0}
th,td{border:1px solid var(--line);padding:.25rem .55rem;text-align:left;vertical-align:middle}
thead th{background:var(--bg2);position:sticky;top:0}
table.sortable th{cursor:pointer}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.wrong td{background:#fdecea}tr.flag td{background:var(--warn)}
.badge{display:inline-block;padding:0 .4rem;border-radius:.6rem;font-size:.8rem;background:var(--bad);color:#fff}
.figs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:0;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid var(--line)}
figcaption{font-size:.85rem;color:var(--muted)}
.thumbs{display:flex;flex-wrap:wrap;gap:.8rem}.thumbs figure{width:min(260px,100%)}
a.thumb img{max-width:100%;height:auto;border:1px solid var(--line);vertical-align:middle}
td a.thumb img{max-height:72px;width:auto}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:.4rem 0 1rem;font-size:.9rem}
dt{color:var(--muted)}dd{margin:0;word-break:break-all}
pre{background:var(--bg2);padding:.6rem;overflow:auto;font-size:.8rem;max-height:30rem}
details{margin:.4rem 0}summary{cursor:pointer;color:var(--accent)}
@media print{thead th{position:static}details{display:block}}
"""

SORT_JS = """
(function () {
  function key(row, i) {
    var c = row.cells[i], s = c ? c.getAttribute("data-sort") : null;
    return s !== null ? parseFloat(s) : (c ? c.textContent.trim() : "");
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.tabIndex = 0;
    function sort() {
      var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, i), y = key(b, i);
        var r = (typeof x === "number" && typeof y === "number") ? x - y
          : String(x).localeCompare(String(y), undefined, {numeric: true});
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(); } });
  });
})();
"""


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def page(title: str, body: Sequence[str]) -> str:
    """The whole document: head (CSP, inline CSS), the ``body`` fragments (:class:`Raw`), the sorting script."""
    csp = (f"default-src 'none'; img-src data:; style-src {_sha(CSS)}; script-src {_sha(SORT_JS)}; "
           "base-uri 'none'; form-action 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + join(body) + f"\n<script>{SORT_JS}</script>\n</body></html>\n")
