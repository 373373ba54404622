"""Random dataset files and damaged store metadata never end in a traceback: a one-line error or data."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtc.config import DatasetConfig
from mtc.data import DatasetError, iter_texts
from mtc.store import ActivationStore, StoreError

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
jsonl_lines = st.one_of(
    st.dictionaries(st.sampled_from(["text", "body", "id"]), json_values, max_size=3).map(json.dumps),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.text(max_size=40),
)


def texts_or_error(path, suffix_content: bytes):
    path.write_bytes(suffix_content)
    try:
        return list(iter_texts(DatasetConfig(path=str(path))))
    except DatasetError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(jsonl_lines, max_size=6))
def test_random_jsonl_files_give_strings_or_one_line(tmp_path, lines):
    texts = texts_or_error(tmp_path / "data.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))
    assert texts is None or all(isinstance(t, str) for t in texts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=3000))
def test_random_bytes_as_a_text_file_give_strings_or_one_line(tmp_path, content):
    texts = texts_or_error(tmp_path / "data.txt", content)
    assert texts is None or all(isinstance(t, str) for t in texts)


@pytest.fixture(scope="module")
def store_copy_source(tiny_pipeline):
    return tiny_pipeline.store_dir


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["tokens.zarr", "L2/mlp_out.zarr", "L2/resid_mid.zarr"]),
    cut=st.integers(0, 2000),
    junk=st.binary(max_size=30),
)
def test_damaged_array_metadata_is_a_store_error(store_copy_source, tmp_path_factory, which, cut, junk):
    store = tmp_path_factory.mktemp("store") / "s"
    shutil.copytree(store_copy_source, store)
    meta = store / which / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:cut] + junk)
    try:
        s = ActivationStore(store)
        site = s.site(2, "mlp_out")
        site.rows(0, 64)
        s.tokens(0, 2)
    except StoreError as e:
        assert "\n" not in str(e)
