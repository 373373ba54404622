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
