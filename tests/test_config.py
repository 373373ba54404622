"""params.yaml is validated whole before any work; bad values name their key and the fix."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from mtc.config import (
    PRESETS,
    ConfigError,
    geometric_groups,
    get_default_cfg,
    load_params,
    parse_params,
    post_init_cfg,
)
from mtc.results import run_dir_of
from tests.conftest import REPO, tiny_params


def bad(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_params(raw)


def with_dict(**changes) -> dict:
    raw = tiny_params()
    raw["dictionaries"]["tc"].update(changes)
    return raw


def test_the_repository_params_are_valid():
    cfg = load_params(REPO / "params.yaml")
    assert cfg.dictionaries, "the default pipeline trains at least one dictionary"


def test_group_sizes_must_sum_to_dict_size():
    bad(
        with_dict(group_sizes=[32, 64, 100]),
        r"dictionaries\.tc\.group_sizes: .*sums to 196.*dict_size is 256",
    )


@pytest.mark.parametrize("sizes", [[0, 96, 160], [-32, 128, 160], [32.5, 63.5, 160], ["32", 64, 160]])
def test_group_sizes_must_be_positive_integers(sizes):
    bad(with_dict(group_sizes=sizes), r"dictionaries\.tc\.group_sizes\[\d\]")


@pytest.mark.parametrize("k", [0, -1, 256, 1000])
def test_top_k_must_be_between_one_and_dict_size(k):
    bad(with_dict(top_k=k), r"dictionaries\.tc\.top_k")


def test_unknown_keys_and_sites_are_named():
    bad(with_dict(grup_sizes=[1]), r"dictionaries\.tc\.grup_sizes: unknown key")
    bad(
        with_dict(source_site="resid_middle"),
        r"dictionaries\.tc\.source_site: got 'resid_middle'; expected one of",
    )
    raw = tiny_params()
    raw["extract"]["sites"] = ["mlp_in"]
    bad(raw, r"extract\.sites\[0\]")
    raw = tiny_params()
    raw["modell"] = {}
    bad(raw, r"modell: unknown section")


def test_a_dictionary_must_read_what_extraction_stores():
    bad(with_dict(layer=3), r"dictionaries\.tc\.layer: got 3; expected one of the extracted layers")
    bad(with_dict(target_site="resid_post"), r"dictionaries\.tc\.target_site: .*extracted sites")


def test_an_sae_reconstructs_its_own_site():
    bad(with_dict(kind="sae", source_site="mlp_out", target_site="resid_mid"), r"kind sae")


def test_unknown_dtype_is_rejected():
    raw = tiny_params()
    raw["extract"]["dtype"] = "bf16"
    bad(raw, r"extract\.dtype: got 'bf16'; expected one of float32, bfloat16, float16")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML \(line \d+"):
        load_params(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_presets_follow_the_seed():
    assert PRESETS["gpt2"]["group_sizes"] == [768, 1536, 3072, 6912]
    assert PRESETS["gemma-2-2b"]["group_sizes"] == [2304, 4608, 9216, 20736]
    for preset in PRESETS.values():
        assert sum(preset["group_sizes"]) == preset["dict_size"]
        assert preset["dict_size"] == 16 * preset["act_size"]


def test_get_default_cfg_and_post_init_cfg_like_the_seed():
    cfg = get_default_cfg(model_type="gemma-2-2b")
    cfg.update(
        {
            "layer": 8,
            "source_site": "resid_mid",
            "target_site": "mlp_out",
            "dict_size": 12288,
            "top_k": 64,
            "group_sizes": [768, 1536, 3072, 6912],
        }
    )
    cfg = post_init_cfg(cfg)
    assert (
        cfg["top_k"] == 64 and cfg["lr"] == 3e-4 and cfg["batch_size"] == 4096 and cfg["save_every"] == 1000
    )
    gpt2 = post_init_cfg(get_default_cfg("gpt2"))
    assert gpt2["dict_size"] == 12288 and gpt2["top_k"] == round(12288 / 200)
    smol = post_init_cfg(get_default_cfg("SmolLM2-135M-Instruct"))
    assert smol["group_sizes"] == [576, 1152, 2304, 5184] and smol["top_k"] == 46
    gemma3 = post_init_cfg(get_default_cfg("gemma-3-270m"))  # packaged:gemma-3-270m's type
    assert (gemma3["act_size"], gemma3["dict_size"], gemma3["top_k"]) == (640, 10240, 51)
    assert gemma3["group_sizes"] == geometric_groups(640, 10240) == [640, 1280, 2560, 5760]


def test_unknown_model_type_gets_a_16x_geometric_dictionary_from_act_size():
    cfg = get_default_cfg("my-model")
    cfg["act_size"] = 100
    cfg = post_init_cfg(cfg)
    assert cfg["dict_size"] == 1600 and cfg["group_sizes"] == [100, 200, 400, 900]
    with pytest.raises(ConfigError, match="dict_size: not set"):
        post_init_cfg(get_default_cfg("my-model"))


def test_run_dirs_follow_the_seed_layout_and_keep_dictionaries_apart():
    raw = tiny_params()
    raw["dictionaries"]["tc2"] = copy.deepcopy(raw["dictionaries"]["tc"])
    cfg = parse_params(raw)
    a, b = run_dir_of(cfg.dictionaries["tc"]), run_dir_of(cfg.dictionaries["tc2"])
    assert str(a) == "results/stories260K/2/150/tc" and a.parent == b.parent and a != b


def test_dvc_yaml_paths_agree_with_the_library():
    """dvc.yaml templates the paths the library computes; they must name the same files, for the
    repository's params and for a cross-layer transcoder."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["extract"]["layers"] = [8, 9]
    raw["dictionaries"]["cross"] = {**raw["dictionaries"]["tc"], "target_layer": 9}
    cfg = parse_params(raw)
    for name, d in cfg.dictionaries.items():
        for out in stages["train"]["do"]["outs"]:
            path = (
                out.replace("${model.type}", cfg.model.type)
                .replace("${item.layer}", str(d.layer))
                .replace("${item.steps}", str(d.steps))
                .replace("${key}", name)
            )
            assert path.startswith(str(run_dir_of(d)) + "/"), path
    assert stages["extract"]["outs"] == ["data/activations/${model.type}"]
    assert str(cfg.store_dir) == f"data/activations/{cfg.model.type}"
    assert str(cfg.model_dir) == f"data/models/{cfg.model.type}"
    for name, stage in stages.items():  # no params value reaches a shell: DVC_STAGE names the dictionary
        assert "${" not in stage.get("do", stage)["cmd"], name


def test_a_transcoder_set_is_one_transcoder_per_layer_where_dvc_yaml_puts_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["extract"]["layers"] = [3, 8]
    raw["transcoder_set"] = {
        "name": "ts",
        "layers": [3, 8],
        "steps": 50,
        "dictionary": {"input_norm": "global"},
    }
    cfg = parse_params(raw)
    members = [cfg.dictionaries["ts-L3"], cfg.dictionaries["ts-L8"]]
    assert [(d.layer, d.kind, d.source_site, d.target_site, d.steps, d.input_norm) for d in members] == [
        (3, "transcoder", "resid_mid", "mlp_out", 50, "global"),
        (8, "transcoder", "resid_mid", "mlp_out", 50, "global"),
    ]
    for d in members:
        for out in stages["train_set"]["outs"]:
            path = (
                out.replace("${model.type}", cfg.model.type)
                .replace("${item.layer}", str(d.layer))
                .replace("${transcoder_set.steps}", "50")
                .replace("${transcoder_set.name}", "ts")
            )
            assert path.startswith(str(run_dir_of(d)) + "/"), path
    assert "transcoder_set.layers" not in stages["train_set"]["params"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers": [5]}, r"transcoder_set.layers\[0\]: got 5; expected one of the extracted layers"),
        ({"dictionary": {"layer": 1}}, "transcoder_set.dictionary.layer: got 1; expected left out"),
        (
            {"dictionary": {"lr": -1}},
            r"transcoder_set.dictionary.lr: got -1; expected a number in \(0.0, 1.0\]",
        ),
        ({"layers": "all"}, "transcoder_set.layers: got 'all'; expected a list of layer indices"),
        ({"lr": 0.1}, "transcoder_set.lr: unknown key"),
        ({"steps": None}, "transcoder_set.steps: got None; expected an integer >= 1"),
        ({"dictionary": {"steps": 5}}, "transcoder_set.dictionary.steps: got 5; expected left out"),
    ],
)
def test_transcoder_set_mistakes_are_named(change, message):
    raw = tiny_params()
    sizes = {"dict_size": 256, "group_sizes": [32, 64, 160], "top_k": 8}
    raw["transcoder_set"] = {"name": "ts", "layers": [2], "steps": 20, **change}
    raw["transcoder_set"]["dictionary"] = {**sizes, **change.get("dictionary", {})}
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_the_example_transcoder_set_is_every_layer_of_the_default_model():
    cfg = load_params(REPO / "examples" / "smollm2-transcoder-set.params.yaml")
    assert cfg.transcoder_set.layers == list(range(30)) == cfg.extract.layers
    # each row scaled by its own RMS (circuit-tracer reads it at mlp.hook_in), with a skip connection
    assert all(cfg.dictionary(f"tcs-L{layer}").input_norm == "token" for layer in range(30))
    assert all(cfg.dictionary(f"tcs-L{layer}").has_skip for layer in range(30))


def test_the_gemma_example_is_every_layer_of_gemma_with_an_exportable_norm():
    cfg = load_params(REPO / "examples" / "gemma-3-270m.params.yaml")
    assert cfg.model.name == "packaged:gemma-3-270m"
    assert cfg.transcoder_set.layers == list(range(18)) == cfg.extract.layers
    dictionaries = [cfg.dictionary(f"tcs-L{layer}") for layer in range(18)]
    # circuit-tracer's export builds `token` normalisation for Llama only
    assert {(d.input_norm, d.act_size, sum(d.group_sizes)) for d in dictionaries} == {("global", 640, 5120)}


# ------------------------------------------------------------------ issue 24: names, YAML as DVC reads it
@pytest.mark.parametrize("where", ["model.type", "dictionary name", "transcoder_set.name"])
def test_a_name_with_a_trailing_newline_is_no_name(where):
    """``re.match`` with ``$`` let "stories260K\\n" through: it became a directory named so."""
    raw = tiny_params()
    if where == "model.type":
        raw["model"]["type"] = "stories260K\n"
    elif where == "dictionary name":
        raw["dictionaries"]["tc\n"] = raw["dictionaries"].pop("tc")
    else:
        raw["transcoder_set"]["name"] = "tcs\n"
    bad(raw, "a name of letters, digits")


def dvc_reads(path):
    """params.yaml as DVC itself parses it, through DVC's own loader."""
    from dvc.utils.serialize import load_yaml

    return load_yaml(str(path))


@pytest.mark.parametrize(
    "steps, lr",
    [("040", "1e-3"), ("1_000", "0.002"), ("0o17", ".5e-2")],
)
def test_params_are_read_exactly_as_dvc_reads_them(tmp_path, steps, lr):
    """YAML 1.1 (PyYAML) reads 040 as 32, 1e-3 as a string; DVC reads YAML 1.2 (40, 0.001): mtc
    wrote results/.../32/tc while DVC looked for .../40/tc and restored an old run from its cache."""
    raw = tiny_params()
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("steps: 150", f"steps: {steps}").replace("lr: 0.003", f"lr: {lr}")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    by_dvc = dvc_reads(path)["dictionaries"]["tc"]
    cfg = load_params(path)
    assert (cfg.dictionaries["tc"].steps, cfg.dictionaries["tc"].lr) == (by_dvc["steps"], by_dvc["lr"])
    assert run_dir_of(cfg.dictionaries["tc"]).parts[3] == str(by_dvc["steps"])


@pytest.mark.parametrize("value", ["1:00", "yes", "on", "NO"])
def test_a_value_yaml_1_1_reads_as_a_number_or_boolean_is_a_string_as_dvc_reads_it(tmp_path, value):
    raw = tiny_params()
    text = yaml.safe_dump(raw, sort_keys=False).replace("steps: 150", f"steps: {value}")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert isinstance(dvc_reads(path)["dictionaries"]["tc"]["steps"], str)
    with pytest.raises(ConfigError, match=rf"dictionaries\.tc\.steps: got '{value}'; expected an integer"):
        load_params(path)


def test_source_layer_alone_stands_for_layer():
    raw = tiny_params()
    entry = raw["dictionaries"]["tc"]
    entry["source_layer"] = entry.pop("layer")
    assert parse_params(raw).dictionaries["tc"].layer == 2
    entry["layer"] = 3
    bad(raw, r"dictionaries\.tc\.source_layer: got 2; expected the same as dictionaries\.tc\.layer \(3\)")


@pytest.mark.parametrize("where", ["model.type", "transcoder_set.name"])
def test_names_dvc_would_mishandle_are_refused(where):
    """NAME.lock is ignored by DVC (lock files beside runs); model type 'sets' would put the sets'
    summaries inside results/sets/{type}/... of their own dependency."""
    raw = tiny_params()
    if where == "model.type":
        raw["model"]["type"] = "sets"
        bad(raw, "model.type: got 'sets'; expected any name but 'sets'")
    raw["model"]["type"] = "stories260K"
    raw["transcoder_set"]["name"] = "tcs.lock"
    bad(raw, "not ending in .lock")


def test_a_stage_learns_its_dictionary_from_its_own_dvc_stage_name():
    """DVC runs per-dictionary scripts with no arguments (no params value in a command): DVC_STAGE
    names the dictionary, or the transcoder set's layer; anything else is refused in one line."""
    from mtc.pipeline import stage_dictionary

    raw = tiny_params()
    raw["extract"]["layers"] = [2, 3]
    tiny = {k: raw["dictionaries"]["tc"][k] for k in ("dict_size", "group_sizes", "top_k")}
    raw["transcoder_set"].update(layers=[3], dictionary=tiny)
    cfg = parse_params(raw)
    assert stage_dictionary(cfg, [], "train@tc") == "tc"
    assert stage_dictionary(cfg, [], "sub/dvc.yaml:evaluate@tc") == "tc"
    assert stage_dictionary(cfg, [], "mine_set@3") == "tcs-L3"
    assert stage_dictionary(cfg, ["tc"], None) == "tc", "by hand: the argument"
    for stage, message in [
        ("train@other", "dictionaries.other: no such dictionary"),
        ("train_set@2", "'2' is not a layer of transcoder_set.layers"),
        ("train_set@../3", "is not a layer of transcoder_set.layers"),
        (None, "no dictionary named"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            stage_dictionary(cfg, [], stage)
