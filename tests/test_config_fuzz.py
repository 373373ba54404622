"""Random and mutated params.yaml content never ends in a traceback: a ConfigError or a config."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtc.config import ConfigError, load_params, parse_params
from tests.conftest import REPO

VALID = yaml.safe_load((REPO / "params.yaml").read_text())

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["resid_mid", "mlp_out", "sae", "bfloat16", "auto"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=12,
)


def leaves(tree, path=()):
    """Every path into the tree: sections and entries as well as scalar values."""
    if path:
        yield path
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from leaves(v, path + (i,))


def replaced(tree, path, value):
    """``tree`` with the value at ``path`` replaced (unchanged if an earlier change removed the path)."""
    new = copy.deepcopy(tree)
    node = new
    try:
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return tree
    return new


def validate(raw) -> None:
    try:
        parse_params(raw)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


PATHS = list(leaves(VALID))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), values)
def test_any_single_value_changed(path, value):
    validate(replaced(VALID, path, value))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=2, max_size=5))
def test_several_values_changed(changes):
    raw = VALID
    for path, value in changes:
        raw = replaced(raw, path, value)
    validate(raw)


@settings(max_examples=150, deadline=None)
@given(values)
def test_arbitrary_structures(raw):
    validate(raw)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_as_a_params_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "params.yaml"
    path.write_text(text)
    try:
        load_params(path)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
