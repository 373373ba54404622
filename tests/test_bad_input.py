"""Each bad input stops the first stage in one line naming the key, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, tiny_params
from tests.helpers import copy_data


def dictionary(**changes):
    def change(raw):
        raw["dictionaries"]["tc"].update(changes)

    return change


def section(part, **changes):
    def change(raw):
        raw[part].update(changes)

    return change


CASES = {
    "group_sizes do not sum to dict_size": (
        dictionary(group_sizes=[32, 64, 100]),
        "dictionaries.tc.group_sizes: [32, 64, 100] sums to 196",
    ),
    "a zero group size": (dictionary(group_sizes=[0, 96, 160]), "dictionaries.tc.group_sizes[0]: got 0"),
    "a fractional group size": (
        dictionary(group_sizes=[32.5, 63.5, 160]),
        "dictionaries.tc.group_sizes[0]: got 32.5",
    ),
    "top_k = 0": (dictionary(top_k=0), "dictionaries.tc.top_k: got 0"),
    "top_k >= dict_size": (
        dictionary(top_k=256),
        "dictionaries.tc.top_k: got 256; expected an integer in [1, dict_size=256)",
    ),
    "unknown site": (
        dictionary(source_site="resid_middle"),
        "dictionaries.tc.source_site: got 'resid_middle'",
    ),
    "layer out of range": (
        lambda raw: raw["extract"].update(layers=[2, 9]),
        "extract.layers[1]: layer 9 is out of range; the model has layers 0..4",
    ),
    "dictionary layer not extracted": (
        dictionary(layer=3),
        "dictionaries.tc.layer: got 3; expected one of the extracted layers",
    ),
    "width that does not match the model": (dictionary(act_size=100), "dictionaries.tc.act_size: got 100"),
    "unknown model path": (
        section("model", name="./no/such/model"),
        "model.name: './no/such/model' does not exist",
    ),
    "unknown dataset path": (
        section("dataset", path="./no/such.jsonl"),
        "dataset.path: './no/such.jsonl' does not exist",
    ),
    "unknown dtype": (section("extract", dtype="bf16"), "extract.dtype: got 'bf16'"),
    "unknown key": (section("dataset", n_token=5), "dataset.n_token: unknown key"),
}


def run_first_stage(tmp_path, params_text):
    (tmp_path / "params.yaml").write_text(params_text)
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare_model.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_value(case, tmp_path, stories_model_dir):
    change, message = CASES[case]
    raw = tiny_params(str(stories_model_dir))
    change(raw)
    result = run_first_stage(tmp_path, yaml.safe_dump(raw))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_resid_mid_on_a_parallel_attention_model(tmp_path):
    from tests.helpers import tiny_hf_models, tiny_random_llama_dir

    model_dir = tmp_path / "neox"
    tiny_hf_models()["neox"].save_pretrained(model_dir)
    tiny_random_llama_dir(tmp_path / "tok")  # borrow a tokenizer
    for f in (tmp_path / "tok").glob("*token*"):
        f.rename(model_dir / f.name)
    work = tmp_path / "work"
    work.mkdir()
    raw = tiny_params(str(model_dir), layer=1)
    raw["extract"]["layers"] = [1]
    result = run_first_stage(work, yaml.safe_dump(raw))
    assert result.returncode == 2 and "extract.sites: resid_mid does not exist in gpt_neox" in result.stderr
    assert "use resid_pre" in result.stderr and sorted(p.name for p in work.iterdir()) == ["params.yaml"]


def test_malformed_yaml(tmp_path):
    result = run_first_stage(tmp_path, "model:\n  name: [unclosed\n")
    assert result.returncode == 2 and result.stderr.startswith("error: params.yaml: not valid YAML (line")
    assert result.stderr.count("\n") == 1


@pytest.fixture
def prepared(tiny_pipeline, tmp_path):
    """A project directory whose model is prepared and whose store is extracted (tiny_pipeline's)."""
    copy_data(tiny_pipeline.data_root, tmp_path / "data")
    raw = tiny_params(tiny_pipeline.model.name)
    return tmp_path, raw


def run_stage(cwd, stage, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=cwd, capture_output=True, text=True
    )


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_dataset_with_fewer_tokens_than_asked(prepared):
    root, raw = prepared
    raw["dataset"]["n_tokens"] = 10**8
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    before = listing(root)
    result = run_stage(root, "extract")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (
        "dataset.n_tokens: asked for 100000000 tokens but" in result.stderr
        and "lower dataset.n_tokens" in result.stderr
    )
    assert listing(root) == before, "nothing written"


def test_a_store_whose_provenance_does_not_match(prepared):
    root, raw = prepared
    raw["dataset"]["holdout_fraction"] = 0.2
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_stage(root, "train", "tc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "store does not match params (n_holdout_sequences: store has 52, params ask 103)" in result.stderr
    assert not (root / "results").exists()


def test_a_finished_run_with_a_different_config(prepared):
    root, raw = prepared
    raw["dictionaries"]["tc"]["steps"] = 20
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert run_stage(root, "train", "tc").returncode == 0
    raw["dictionaries"]["tc"]["lr"] = 0.01
    (root / "params.yaml").write_text(yaml.safe_dump(raw))

    def stamps():  # the lock file beside the run is the lock, not the run
        return {p: p.stat().st_mtime_ns for p in (root / "results").rglob("*") if p.suffix != ".lock"}

    before = stamps()
    result = run_stage(root, "train", "tc")
    assert result.returncode == 2 and "holds a finished run with a different config" in result.stderr
    assert stamps() == before, "the finished run is untouched"


def test_a_corrupted_store_chunk_stops_training_in_one_line(prepared):
    root, raw = prepared
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shard = root / "data" / "activations" / "stories260K" / "L2" / "mlp_out.zarr" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte inside one of the shard's inner chunks
    shard.write_bytes(bytes(data))
    result = run_stage(root, "train", "tc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "L2/mlp_out.zarr: chunk " in result.stderr and "is corrupt or truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_without_the_model_and_browse_without_mined_samples(prepared):
    import shutil

    root, raw = prepared
    raw["dictionaries"]["tc"]["steps"] = 10
    raw["dictionaries"]["tc"]["save_every"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert run_stage(root, "train", "tc").returncode == 0
    result = run_stage(root, "browse", "tc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no mined samples" in result.stderr
    shutil.rmtree(root / "data" / "models")
    result = run_stage(root, "evaluate", "tc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no model here (config.json missing)" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ round 2: each of these failed on main
@pytest.fixture
def first_stage_here(monkeypatch, capsys):
    """Like run_first_stage, in this process (the same stage runner and error path, no start-up)."""
    from mtc import pipeline

    def run(root, params_text):
        (root / "params.yaml").write_text(params_text)
        monkeypatch.chdir(root)
        with pytest.raises(SystemExit) as stop:
            pipeline.run_stage(pipeline.prepare_model)
        return subprocess.CompletedProcess([], stop.value.code, "", capsys.readouterr().err)

    return run


def one_line(result, message, code=2):
    """Exit code 2 and one ``error:`` line with the message (evaluate may warn before it)."""
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in errors[0], result.stderr


def test_a_key_given_twice_is_refused_with_the_line_of_the_second(tmp_path, stories_model_dir):
    text = yaml.safe_dump(tiny_params(str(stories_model_dir)))
    second = text.count("\n") + 1
    text += "dictionaries:\n  other:\n    layer: 2\n"  # a second block would drop the first
    one_line(
        run_first_stage(tmp_path, text), f"key 'dictionaries' appears twice in one mapping (line {second})"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_params_file_is_refused(tmp_path, text, first_stage_here):
    one_line(first_stage_here(tmp_path, text), "params.yaml: empty; it needs at least the model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_context_longer_than_the_models_positions(tmp_path, stories_model_dir, first_stage_here):
    raw = tiny_params(str(stories_model_dir))
    raw["dataset"]["context_size"] = 1024  # stories260K has 512 positions
    one_line(
        first_stage_here(tmp_path, yaml.safe_dump(raw)),
        "dataset.context_size: got 1024; llama has only 512 positions",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("content", ["empty", "readme only", "config without model_type"])
def test_a_model_directory_that_is_not_a_model(tmp_path, content, first_stage_here):
    model = tmp_path / "not-a-model"
    model.mkdir()
    if content == "readme only":
        (model / "README.md").write_text("# a model card\n")
    if content == "config without model_type":
        (model / "config.json").write_text('{"hidden_size": 8}')
    work = tmp_path / "work"
    work.mkdir()
    result = first_stage_here(work, yaml.safe_dump(tiny_params(str(model))))
    message = (
        "not a Hugging Face model config" if content.startswith("config") else "is not a model directory"
    )
    one_line(result, message)
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"], "no empty data/models/ left behind"


def test_extract_before_prepare_model_says_what_to_run(tmp_path):
    raw = tiny_params("packaged:SmolLM2-135M-Instruct")
    raw["model"]["type"] = "SmolLM2-135M-Instruct"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    one_line(run_stage(tmp_path, "extract"), "run the prepare_model stage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2: not UTF-8 text"),
        ("number.jsonl", b'{"text": "fine"}\n{"text": 5}\n', "number.jsonl:2: field 'text' is int"),
        ("random.txt", bytes(range(256)) * 400, "random.txt: not text"),
        ("random.bin", bytes(range(256)) * 400, "random.bin: not text"),
    ],
)
def test_a_dataset_file_that_is_not_text(prepared, name, content, message, monkeypatch, capsys):
    from mtc import pipeline

    root, raw = prepared
    (root / name).write_bytes(content)
    raw["dataset"]["path"] = str(root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    before = listing(root)
    monkeypatch.chdir(root)  # in this process: the stage runner's own error path, without a start-up
    with pytest.raises(SystemExit) as stop:
        pipeline.run_stage(pipeline.extract)
    one_line(subprocess.CompletedProcess([], stop.value.code, "", capsys.readouterr().err), message)
    assert listing(root) == before, "nothing written"


def test_a_batch_larger_than_the_store_is_refused_before_anything_is_written(prepared):
    root, raw = prepared
    raw["dictionaries"]["tc"]["batch_size"] = 10**12
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    one_line(
        run_stage(root, "train", "tc"), "dictionaries.tc.batch_size: got 1000000000000; the store has only"
    )
    assert not (root / "results").exists(), "no config.json, checkpoints or lock"


@pytest.mark.parametrize("damage", ["truncated tokens zarr.json", "corrupt tokens chunk"])
def test_store_damage_is_one_line_in_train_and_evaluate(prepared, damage):
    root, raw = prepared
    raw["dictionaries"]["tc"].update(steps=5, save_every=5)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert run_stage(root, "train", "tc").returncode == 0
    tokens = root / "data" / "activations" / "stories260K" / "tokens.zarr"
    if damage.startswith("truncated"):
        meta = tokens / "zarr.json"
        meta.write_bytes(meta.read_bytes()[:100])
        stages, message = ["train", "evaluate"], "tokens.zarr/zarr.json: unreadable array metadata"
    else:  # every chunk, so the held-out windows read by evaluate's spliced loss too
        for shard in (tokens / "c").glob("*/0"):
            data = bytearray(shard.read_bytes())
            for i in range(0, len(data) - 1024, 97):  # every inner chunk; the index at the end stays
                data[i] ^= 0xFF
            shard.write_bytes(bytes(data))
        stages, message = ["evaluate"], "tokens.zarr: chunk"
    for stage in stages:
        result = run_stage(root, stage, "tc")
        one_line(result, message)
        assert "dvc repro -f extract" in result.stderr
