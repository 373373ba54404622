"""A static feature browser: ``index.html`` and one page per feature, opened from disk.

Everything is inline (CSS, a few lines of JavaScript for sorting and filtering, SVG histograms):
no server, no network. Built from the mine stage's output (``activation_samples/mined``) and, when
present, the run's ``metrics.json`` (headline numbers on the index).

The index lists every feature (group, firing frequency, largest activation, the tokens it fires on
most, the tokens it promotes); a click on a column header sorts by it, and ``index.html#sort=frequency``
opens it sorted. A feature page shows its top-activating contexts and random contexts from each
activation quantile band, every token shaded by the feature's activation on it, its activation
histogram and the tokens its decoder direction promotes and suppresses.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mtc import progress
from mtc.config import BrowseConfig
from mtc.errors import BrowseError
from mtc.results import (
    BROWSER_DIR,
    METRICS_FILE,
    MINED_SAMPLES_DIR,
    atomic_write_text,
    check_output_dir,
    read_json,
    swapped_in_dir,
)
from mtc.samples import FEATURES_FILE, META_FILE, QUANTILE_FILE, ActivationSampleAnalyzer

INDEX = "index.html"
PAGES = "features"
_PAGE_NAME = re.compile(r"\d+\.html")  # a feature page, in PAGES


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}a{color:#0550ae}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;background:#f6f8fa;position:sticky;top:0;user-select:none}th:hover{background:#e8ecf0}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.dead td{color:#999}
.ctx{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;padding:4px 6px;margin:2px 0;
border-left:3px solid #ddd;background:#fcfcfc}
.ctx .act{font-size:11px;color:#666;display:inline-block;width:5em}
.tok{border-radius:2px}.hit{outline:1.5px solid #c03;font-weight:bold}
.stats span{margin-right:2em}.tokens span{display:inline-block;margin:2px;padding:1px 6px;border-radius:3px;
font-family:ui-monospace,monospace;font-size:13px}.up{background:#dbeafe}.down{background:#fee2e2}
.muted{color:#777}svg text{font-size:10px;fill:#555}.cols{display:flex;gap:3em;flex-wrap:wrap}
"""

SORT_JS = """
function sortBy(col, descending){
  const body=document.querySelector('#features tbody');
  const rows=Array.from(body.rows);
  const key=r=>{const v=r.cells[col].dataset.v; return v===undefined?r.cells[col].textContent:parseFloat(v);};
  rows.sort((a,b)=>{const x=key(a),y=key(b);const c=(x<y)?-1:(x>y)?1:0;return descending?-c:c;});
  rows.forEach(r=>body.appendChild(r));
  document.querySelectorAll('#features th').forEach(
    (th,i)=>th.dataset.sorted=(i===col)?(descending?'desc':'asc'):'');
}
document.querySelectorAll('#features th').forEach(
  (th,i)=>th.addEventListener('click',()=>sortBy(i,th.dataset.sorted!=='desc')));
function filterGroup(g){document.querySelectorAll('#features tbody tr').forEach(r=>{
  r.style.display=(g===''||r.dataset.group===g)?'':'none';});}
document.getElementById('group').addEventListener('change',e=>filterGroup(e.target.value));
const m=location.hash.match(/sort=(\\w+)/);
if(m){const th=document.querySelector('#features th[data-key="'+m[1]+'"]'); if(th) sortBy(th.cellIndex,true);}
"""


def token_strings(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """How each token reads inside a context: the tokenizer's own piece-to-text conversion (byte-level
    BPE bytes and SentencePiece byte tokens become characters), keeping SentencePiece's leading space,
    which decoding a single piece drops."""
    ids = sorted(i for i in ids if i >= 0)
    out = {}
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        piece = piece or ""
        text = tokenizer.convert_tokens_to_string([piece])
        out[i] = " " + text if piece.startswith("▁") and not text.startswith(" ") else text
    return out


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _shown(text: str) -> str:
    """A token as it can be shown inline: newlines and tabs as visible marks, other control
    characters (byte-fallback tokens such as ``<0x00>``) as their code, ``<0x00>``."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return html.escape(_CONTROL.sub(lambda m: f"<0x{ord(m.group()):02X}>", text))


def _context_html(sample: dict[str, Any], tokens: dict[int, str], scale: float) -> str:
    spans = []
    acts = sample.get("token_acts") or [0.0] * len(sample["token_ids"])
    for j, (tid, a) in enumerate(zip(sample["token_ids"], acts)):
        alpha = min(1.0, max(0.0, a / scale)) if scale > 0 else 0.0
        cls = "tok hit" if j == sample["token_index"] else "tok"
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
        spans.append(f'<span class="{cls}"{style} title="{a:.3f}">{_shown(tokens.get(tid, "?"))}</span>')
    return f'<div class="ctx"><span class="act">{sample["activation"]:.3f}</span>{"".join(spans)}</div>'


def _histogram_svg(counts: list[int], max_act: float, width: int = 420, height: int = 120) -> str:
    top = max(counts) if counts and max(counts) > 0 else 1
    bar = width / max(1, len(counts))
    bars = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        lo, hi = max_act * i / len(counts), max_act * (i + 1) / len(counts)
        bars.append(
            f'<rect x="{i * bar:.1f}" y="{height - 15 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
            f'fill="#f28c28"><title>{lo:.2f}–{hi:.2f}: {c}</title></rect>'
        )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{"".join(bars)}'
        f'<text x="0" y="{height - 2}">0</text><text x="{width - 40}" y="{height - 2}">{max_act:.2f}</text>'
        f'<text x="0" y="10">{top} firings</text></svg>'
    )


def _token_list(items: list[tuple[int, float]], tokens: dict[int, str], cls: str) -> str:
    return "".join(
        f'<span class="{cls}" title="{s:+.3f}">{_shown(tokens.get(i, "?"))}</span>' for i, s in items
    )


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}"
        f"{f'<script>{script}</script>' if script else ''}</body></html>\n"
    )


class Site:
    """The data of one mined run, ready to render."""

    def __init__(self, run_dir: Path, tokenizer: Any = None):
        mined = run_dir / MINED_SAMPLES_DIR
        if not (mined / META_FILE).is_file():
            raise BrowseError(
                f"{run_dir}: no mined samples (activation_samples/mined/meta.json); run the mine stage "
                "(dvc repro mine@NAME, or mtc mine NAME)"
            )
        if not (mined / FEATURES_FILE).is_file() or not (mined / QUANTILE_FILE).is_file():
            raise BrowseError(f"{mined}: mined by an older mtc (no {FEATURES_FILE}); re-run the mine stage")
        self.run_dir = run_dir
        self.a = ActivationSampleAnalyzer(mined, tokenizer)
        if tokenizer is None and not Path(self.a.meta["tokenizer_dir"]).is_dir():
            raise BrowseError(
                f"{mined}: its tokenizer directory {self.a.meta['tokenizer_dir']!r} is not here; "
                "run from the project directory, or pass --tokenizer DIR"
            )
        self.info = self.a.feature_info
        self.group_sizes = self.a.meta["group_sizes"]
        self.n_tokens = self.a.meta["n_tokens_seen"]
        self.metrics = read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else {}
        self.fire_count = self.info["fire_count"].tolist()
        self.max_act = self.info["max_activation"].tolist()
        ends = [sum(self.group_sizes[: i + 1]) for i in range(len(self.group_sizes))]
        self.group = [next(g for g, e in enumerate(ends) if f < e) for f in range(len(self.fire_count))]
        ids = set(self.a.contexts.flatten().tolist()) | set(self.a.quantile["contexts"].flatten().tolist())
        for name in ("promoted_ids", "suppressed_ids"):
            if name in self.info:
                ids |= set(self.info[name].flatten().tolist())
        self.tokens = token_strings(self.a.tokenizer, ids)

    def effects(self, f: int, name: str) -> list[tuple[int, float]]:
        if f"{name}_ids" not in self.info:
            return []
        return list(zip(self.info[f"{name}_ids"][f].tolist(), self.info[f"{name}_scores"][f].tolist()))

    def top_tokens(self, f: int, n: int = 3) -> str:
        """The tokens the feature fires on most often among its top contexts."""
        ids = self.a.contexts[f, :, :]
        rows = self.a.rows[f]
        counts = Counter(
            int(ids[j, int(self.a.token_index[f, j])]) for j in range(rows.shape[0]) if rows[j] >= 0
        )
        return " ".join(repr(self.tokens.get(t, "?")) for t, _ in counts.most_common(n))

    def index(self, pages: set[int]) -> str:
        rows = []
        for f, count in enumerate(self.fire_count):
            freq = count / max(1, self.n_tokens)
            log_freq = math.log10(freq) if count else -99.0
            name = f'<a href="{PAGES}/{f}.html">{f}</a>' if f in pages else str(f)
            promoted = " ".join(repr(self.tokens.get(i, "?")) for i, _ in self.effects(f, "promoted")[:3])
            rows.append(
                f'<tr data-group="{self.group[f]}"{" class=dead" if not count else ""}>'
                f'<td data-v="{f}">{name}</td>'
                f'<td data-v="{self.group[f]}">{self.group[f]}</td>'
                f'<td class="num" data-v="{log_freq:.4f}">{f"{100 * freq:.3g}%" if count else "dead"}</td>'
                f'<td class="num" data-v="{self.max_act[f]:.4f}">{self.max_act[f]:.3g}</td>'
                f"<td>{html.escape(self.top_tokens(f)) if count else ''}</td>"
                f"<td>{html.escape(promoted)}</td></tr>"
            )
        options = "".join(
            f'<option value="{g}">group {g} ({s} features)</option>' for g, s in enumerate(self.group_sizes)
        )
        head = "".join(
            f'<th data-key="{k}">{label}</th>'
            for k, label in (
                ("feature", "feature"),
                ("group", "group"),
                ("frequency", "frequency"),
                ("max", "max activation"),
                ("fires_on", "fires most on"),
                ("promotes", "promotes"),
            )
        )
        body = (
            f"<h1>Features of {html.escape(str(self.run_dir))}</h1>{self._summary()}"
            f'<p>Filter: <select id="group"><option value="">all groups</option>{options}</select> '
            f'<span class="muted">Click a column to sort. {len(pages)} feature pages.</span></p>'
            f'<table id="features"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        )
        return _page(f"mtc features: {self.run_dir.name}", body, SORT_JS)

    def _summary(self) -> str:
        alive = sum(1 for c in self.fire_count if c)
        parts = [
            f"{len(self.fire_count)} features in groups {self.group_sizes}",
            f"{alive} fired on {self.n_tokens} held-out tokens",
        ]
        m = self.metrics
        if m.get("fvu_per_prefix"):
            parts.append("FVU per prefix " + ", ".join(f"{v:.3f}" for v in m["fvu_per_prefix"]))
        if m.get("ce_recovered_vs_zero_per_prefix"):
            parts.append(
                "CE loss recovered (vs zero ablation) per prefix "
                + ", ".join("–" if v is None else f"{v:.3f}" for v in m["ce_recovered_vs_zero_per_prefix"])
            )
        return "<p>" + "; ".join(parts) + ".</p>"

    def feature_page(self, f: int, contexts: int) -> str:
        count, g = self.fire_count[f], self.group[f]
        start = sum(self.group_sizes[:g])
        top = self.a.samples(f, contexts)
        tail = self.a.quantile_samples(f)
        scale = self.max_act[f]
        bands = self.a.meta["quantile_bands"]

        def token_list(direction: str, css: str) -> str:
            return _token_list(self.effects(f, direction), self.tokens, css)

        tail_html = []
        for b in range(bands):
            chunk = [s for s in tail if s["band"] == b]
            if chunk:
                label = f"quantile band {b + 1} of {bands}" + (
                    " (lowest)" if b == 0 else " (highest)" if b == bands - 1 else ""
                )
                tail_html.append(
                    f"<h3>{label}</h3>" + "".join(_context_html(s, self.tokens, scale) for s in chunk)
                )
        nav = (
            f'<p><a href="../{INDEX}">all features</a>'
            + (f' · <a href="{f - 1}.html">← {f - 1}</a>' if f > 0 else "")
            + (f' · <a href="{f + 1}.html">{f + 1} →</a>' if f + 1 < len(self.fire_count) else "")
            + "</p>"
        )
        body = (
            f'{nav}<h1>Feature {f}</h1><p class="stats">'
            f"<span>group {g} (features {start}–{start + self.group_sizes[g] - 1})</span>"
            f"<span>fires on {count} of {self.n_tokens} held-out tokens "
            f"({100 * count / max(1, self.n_tokens):.3g}%)</span>"
            f"<span>max activation {scale:.3f}</span></p>"
            f'<div class="cols"><div><h2>Activation histogram</h2>'
            f"{_histogram_svg(self.info['histogram'][f].tolist(), scale)}</div>"
            f'<div><h2>Promoted tokens</h2><div class="tokens">{token_list("promoted", "up")}</div>'
            f'<h2>Suppressed tokens</h2><div class="tokens">{token_list("suppressed", "down")}</div>'
            '<p class="muted">Direct effect of the decoder direction through the final norm and '
            "unembedding.</p>"
            "</div></div>"
            '<h2>Top activations</h2><div id="top">'
            f"{''.join(_context_html(s, self.tokens, scale) for s in top)}</div>"
            f'<h2>Random firings by activation quantile</h2><div id="quantiles">{"".join(tail_html)}</div>'
        )
        return _page(f"feature {f}", body)


def build_site(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    cfg: BrowseConfig | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the browser for ``run_dir`` to ``out_dir`` (default ``run_dir/browser``); returns its index."""
    cfg = cfg or BrowseConfig()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / BROWSER_DIR
    check_output_dir(out_dir, is_browser_site, "mtc browse")
    site = Site(run_dir, tokenizer)
    fired = [f for f, c in enumerate(site.fire_count) if c > 0]
    pages = fired if cfg.max_feature_pages is None else fired[: cfg.max_feature_pages]
    with swapped_in_dir(out_dir) as tmp:  # the site appears whole or not at all
        (tmp / PAGES).mkdir()
        with progress.bar("browse", total=len(pages), unit="pages") as advance:
            for f in pages:
                (tmp / PAGES / f"{f}.html").write_text(
                    site.feature_page(f, cfg.contexts_per_feature), encoding="utf-8"
                )
                advance(1)
        atomic_write_text(tmp / INDEX, site.index(set(pages)))
    return out_dir / INDEX


def is_browser_site(directory: Path) -> bool:
    """Whether ``directory`` holds what ``build_site`` writes and nothing else (so replacing it
    loses nothing mtc did not write)."""
    index, pages = directory / INDEX, directory / PAGES
    if {p.name for p in directory.iterdir()} - {INDEX, PAGES} or not index.is_file():
        return False
    if pages.exists() and not (pages.is_dir() and all(_PAGE_NAME.fullmatch(p.name) for p in pages.iterdir())):
        return False
    with open(index, encoding="utf-8", errors="replace") as f:
        return "<title>mtc features: " in f.read(4096)
