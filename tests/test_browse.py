"""The static feature browser opens from disk in headless Chromium: the index lists the features
and sorts them, a feature page renders its contexts; a screenshot of one is saved."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from mtc import pipeline
from mtc.config import parse_params
from tests.conftest import tiny_params

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)


@pytest.fixture(scope="module")
def run(tiny_pipeline, tmp_path_factory):
    """A trained, evaluated and mined transcoder, and its browser."""
    raw = tiny_params(steps=60, save_every=60)
    raw["model"]["name"] = tiny_pipeline.model.name
    raw["evaluate"]["n_ce_sequences"] = (
        0  # the browser shows the spliced loss when there is one; not needed here
    )
    raw["browse"]["max_feature_pages"] = None
    root = tmp_path_factory.mktemp("browse")
    cfg = parse_params(raw, data_root=tiny_pipeline.data_root, results_root=root / "results")
    [run_dir] = pipeline.train(cfg, ["tc"])
    pipeline.evaluate(cfg, "tc")
    pipeline.mine(cfg, "tc")
    return cfg, run_dir, pipeline.browse(cfg, "tc")


def chromium(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_site_is_self_contained(run):
    _, run_dir, index = run
    pages = sorted((index.parent / "features").glob("*.html"))
    from safetensors.torch import load_file

    fired = int(
        (load_file(str(run_dir / "activation_samples/mined/features.safetensors"))["fire_count"] > 0).sum()
    )
    assert len(pages) == fired, "a page for every feature that fired"
    for page in [index, *pages[:20]]:
        text = page.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), (
            f"{page.name} loads something from the network"
        )


def test_chromium_renders_the_index_and_a_feature_page(run, tmp_path):
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install chromium; scripts/setup.sh installs it as root)"
        if os.environ.get("MTC_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + ", and MTC_REQUIRE_CHROMIUM=1 (CI) asks for it")
        pytest.skip(message)
    cfg, _, index = run
    dom = chromium("--dump-dom", index.as_uri() + "#sort=frequency").stdout
    rows = re.findall(r'<tr data-group="(\d)"[^>]*><td data-v="(\d+)">', dom)
    assert len(rows) == 256, "the index lists every feature"
    freqs = [float(v) for v in re.findall(r'<td class="num" data-v="(-?[\d.]+)">', dom)[::2]]
    assert freqs == sorted(freqs, reverse=True), "#sort=frequency ran the page's script: most frequent first"
    first = rows[0][1]
    page = index.parent / "features" / f"{first}.html"
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert f"<h1>Feature {first}</h1>" in dom
    top = dom.split('<div id="top">', 1)[1].split("</div><h2>", 1)[0]
    assert top.count('class="ctx"') == min(cfg.browse.contexts_per_feature, cfg.mine.max_samples_per_feature)
    assert top.count('class="tok hit"') == top.count('class="ctx"'), (
        "the activating token is marked in each context"
    )
    assert "<svg" in dom and 'class="up"' in dom and "quantile band 1" in dom
    shot = tmp_path / f"feature_{first}.png"
    chromium(f"--screenshot={shot}", "--window-size=1100,1300", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("MTC_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["MTC_SCREENSHOT_DIR"])


def test_mtc_browse_writes_the_site_where_asked_and_names_a_run_without_samples(run, tmp_path):
    _, run_dir, _ = run
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtc.cli",
            "browse",
            str(run_dir),
            "--out",
            str(tmp_path / "site"),
            "--max-feature-pages",
            "5",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "site" / "features").glob("*.html"))) == 5
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "browse", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no mined samples" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "browse", str(run_dir), "--max-feature-pages", "-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        result.returncode == 2
        and "--max-feature-pages: got -1" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_browse_params_are_validated():
    from mtc.config import ConfigError

    raw = tiny_params()
    raw["browse"] = {"max_feature_pages": "all"}
    with pytest.raises(ConfigError, match="browse.max_feature_pages: got 'all'"):
        parse_params(raw)
    raw["browse"] = {"max_feature_pages": None, "contexts_per_feature": 3}
    assert parse_params(raw).browse.contexts_per_feature == 3


def _tree(directory):
    """Every path under ``directory`` with its bytes (directories as None)."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(directory.rglob("*"))}


def test_mtc_browse_refuses_an_out_directory_holding_other_files_in_one_line_and_deletes_nothing(run):
    cfg, run_dir, _ = run
    before = _tree(cfg.results_root)
    result = subprocess.run(
        [sys.executable, "-m", "mtc.cli", "browse", str(run_dir), "--out", str(cfg.results_root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: {cfg.results_root}: a directory holding other files" in result.stderr
    assert _tree(cfg.results_root) == before, "every run is still there, unchanged"


def test_browse_refuses_the_run_directory_itself_a_file_and_a_directory_with_a_users_files(run, tmp_path):
    from mtc.browse import build_site
    from mtc.config import ConfigError

    cfg, run_dir, _ = run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    before = _tree(run_dir)
    for out, problem in (
        (run_dir, "a directory holding other files"),
        (notes, "a directory holding other files"),
        (tmp_path / "a-file", "a file is there"),
    ):
        with pytest.raises(ConfigError, match=problem):
            build_site(run_dir, out, cfg.browse)
    assert _tree(run_dir) == before
    assert (notes / "todo.txt").read_text() == "mine" and (tmp_path / "a-file").read_text() == "mine"


def test_browse_replaces_its_own_earlier_site_whole_and_leaves_what_is_beside_it(run, tmp_path):
    from mtc.browse import build_site
    from mtc.config import BrowseConfig

    _, run_dir, _ = run
    out = tmp_path / "site"
    (tmp_path / "site.tmp").mkdir()  # a user's directory that only looks like a temporary
    (tmp_path / "site.tmp" / "keep.txt").write_text("mine")
    build_site(run_dir, out, BrowseConfig(max_feature_pages=5))
    index = build_site(run_dir, out, BrowseConfig(max_feature_pages=3))
    assert index == out / "index.html" and index.is_file()
    assert len(list((out / "features").glob("*.html"))) == 3, "no page of the earlier site is left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "site.tmp"], "no temporaries left"
    assert (tmp_path / "site.tmp" / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_site(run_dir, empty, BrowseConfig(max_feature_pages=1)).is_file()


def test_control_bytes_of_byte_fallback_tokens_are_shown_as_their_codes_never_raw(run):
    from mtc.browse import Site

    _, run_dir, _ = run
    site = Site(run_dir)
    controls = [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]  # all but \t and \n, shown as ⇥ and ↵
    for i, tid in enumerate(sorted(site.tokens)):
        site.tokens[tid] = "<&>" + chr(controls[i % len(controls)])
    f = next(f for f, c in enumerate(site.fire_count) if c)
    pages = site.feature_page(f, 5) + site.index({f})
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", pages), "no raw control byte in the pages"
    assert "&lt;&amp;&gt;&lt;0x" in pages, "HTML is escaped as before, the control byte shown as <0xNN>"
    shown = {int(code, 16) for code in re.findall(r"&lt;0x([0-9A-F]{2})&gt;", pages)}
    assert shown and shown <= set(controls)
