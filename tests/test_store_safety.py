"""A store's readers never read zeros for data that is not there, never delete a live reader's
snapshot, and never size memory from metadata the store's files do not back."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mtc.store import READERS_DIR, ActivationStore, StoreError
from tests.helpers import copy_data
from tests.test_store import open_writer, write_rows

SITE_SHARD = Path("L0") / "mlp_out.zarr" / "c" / "2" / "0"


def small_store(path: Path) -> Path:
    """10 windows of 8 tokens; 16-row shards, so the site has 5 shard files and the tokens 5."""
    writer = open_writer(path)
    write_rows(writer, 10, 8, 4)
    writer.close()
    return path


def snapshot_of(store_dir: Path) -> Path:
    [snapshot] = [p for p in (store_dir.parent / READERS_DIR).iterdir() if p.is_dir()]
    return snapshot


# ------------------------------------------------------------------------------ missing shard files
def test_a_shard_deleted_from_an_open_readers_snapshot_is_an_error_naming_it_not_zeros(tmp_path):
    store = ActivationStore(small_store(tmp_path / "s"))
    site = store.site(0, "mlp_out")
    (snapshot_of(tmp_path / "s") / SITE_SHARD).unlink()
    with pytest.raises(StoreError) as e:
        site.rows(0, 80)
    message = str(e.value)
    assert "L0/mlp_out.zarr/c/2/0: shard file is missing" in message and "\n" not in message
    torch.testing.assert_close(site.rows(0, 32)[:, 0], torch.arange(32.0))  # shards still there read


def test_training_batches_stop_at_a_shard_deleted_mid_read(tmp_path):
    store = ActivationStore(small_store(tmp_path / "s"))
    batches = store.iter_training_batches([(0, "mlp_out")], batch_size=7, seed=0, shuffle_chunks=1)
    next(batches)
    for shard in (snapshot_of(tmp_path / "s") / "L0" / "mlp_out.zarr" / "c").iterdir():
        (shard / "0").unlink()
    with pytest.raises(StoreError, match=r"mlp_out.zarr/c/\d+/0: shard file is missing"):
        for _ in range(20):  # more than an epoch's worth of batches
            next(batches)


def test_a_token_shard_deleted_after_opening_is_an_error(tmp_path):
    store = ActivationStore(small_store(tmp_path / "s"))
    (snapshot_of(tmp_path / "s") / "tokens.zarr" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=r"tokens.zarr/c/1/0: shard file is missing"):
        store.tokens()


def test_a_shard_deleted_under_a_url_reader_is_an_error(tmp_path):
    store = ActivationStore(f"file://{small_store(tmp_path / 's')}")
    site = store.site(0, "mlp_out")
    (tmp_path / "s" / SITE_SHARD).unlink()
    with pytest.raises(StoreError, match=r"file://.*/s/L0/mlp_out.zarr/c/2/0: shard file is missing"):
        site.rows(0, 80)


# ------------------------------------------------------------------------------ readers' snapshots
READER = """
import sys
from mtc.store import ActivationStore
store = ActivationStore(sys.argv[1])
print(store._read_dir, flush=True)
sys.stdin.read()  # reads until told to stop
print(float(store.site(0, "mlp_out").rows(0, 80).sum()), flush=True)
"""

OPEN_STORE = (
    "import os, sys; from mtc.store import ActivationStore; ActivationStore(sys.argv[1]); print(os.getpid())"
)


def start_reader(store_dir: Path) -> tuple[subprocess.Popen, Path]:
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(store_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return reader, Path(reader.stdout.readline().strip())


def in_new_pid_namespace() -> list[str]:
    """The command prefix that runs a process in a PID namespace of its own (skips if none can)."""
    for prefix in (["unshare", "--pid", "--fork"], ["unshare", "--pid", "--fork", "--map-root-user"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
        except FileNotFoundError:
            break
    pytest.skip("cannot make a PID namespace here (no unshare, or not permitted)")


def test_a_live_readers_snapshot_survives_a_sweep_from_another_pid_namespace(tmp_path):
    """The other namespace cannot see the reader's process id: it must not take it for dead."""
    prefix = in_new_pid_namespace()
    store_dir = small_store(tmp_path / "s")
    expected = float(ActivationStore(store_dir).site(0, "mlp_out").rows(0, 80).sum())
    reader, snapshot = start_reader(store_dir)
    try:
        sweep = subprocess.run(
            [*prefix, sys.executable, "-c", OPEN_STORE, str(store_dir)], capture_output=True, text=True
        )
        assert sweep.returncode == 0, sweep.stderr
        assert sweep.stdout.strip() == "1", "the sweeping process ran in its own PID namespace"
        assert snapshot.is_dir() and (snapshot / SITE_SHARD).is_file(), "the live reader's snapshot is kept"
        out, _ = reader.communicate("", timeout=60)
        assert float(out) == expected, "the reader read its own data to the end"
    finally:
        reader.kill()
    assert not snapshot.exists(), "the reader removed its snapshot at exit"


def test_a_killed_readers_snapshot_is_removed_by_the_next_reader(tmp_path):
    store_dir = small_store(tmp_path / "s")
    reader, snapshot = start_reader(store_dir)
    os.kill(reader.pid, signal.SIGKILL)
    reader.wait()
    assert snapshot.is_dir()
    ActivationStore(store_dir)
    assert not snapshot.exists() and not snapshot.with_name(snapshot.name + ".lock").exists()


def test_a_snapshot_without_a_lock_is_never_removed_on_a_guess(tmp_path):
    """An older mtc's snapshot (named by a process id, no lock): its reader may be alive elsewhere."""
    store_dir = small_store(tmp_path / "s")
    pid = next(p for p in range(4_000_000, 1_000, -997) if not Path(f"/proc/{p}").exists())
    old = tmp_path / READERS_DIR / f"s.{pid}.0"
    (old / "tokens.zarr").mkdir(parents=True)
    ActivationStore(store_dir)
    assert (old / "tokens.zarr").is_dir()


def test_another_hosts_snapshot_is_left_to_that_host(tmp_path):
    """Some shared filesystems keep flock to one node: a free lock made elsewhere proves nothing."""
    store_dir = small_store(tmp_path / "s")
    other = tmp_path / READERS_DIR / "s.4242-0"
    (other / "tokens.zarr").mkdir(parents=True)
    other.with_name(other.name + ".lock").write_text("another-node")
    ActivationStore(store_dir)
    assert (other / "tokens.zarr").is_dir() and other.with_name(other.name + ".lock").is_file()


# ------------------------------------------------------------------------------ implausible metadata
@contextmanager
def memory_cap(extra: int):
    """This process may map at most ``extra`` more bytes while the block runs."""
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    before = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def edit_metadata(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta, meta["codecs"][0]["configuration"])  # the sharding codec: inner chunk shape
    path.write_text(json.dumps(meta))


def huge_token_rows(meta, _):
    meta["shape"][0] = 10**12


def huge_token_rows_and_provenance(meta, _):
    meta["shape"][0] = meta["attributes"]["n_sequences"] = 10**12


def huge_width(meta, _):
    meta["shape"][1] = 10**9


def huge_width_chunks_and_shards(meta, sharding):
    meta["shape"][1] = meta["chunk_grid"]["configuration"]["chunk_shape"][1] = 10**9
    sharding["chunk_shape"][1] = meta["attributes"]["d_model"] = 10**9


def huge_shards(meta, _):
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**40


def huge_token_shards_and_provenance(meta, _):
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**34  # windows: 2**40 rows
    meta["attributes"]["shard_rows"] = 2**40


def float32_in_the_attrs(meta, _):
    meta["attributes"]["dtype"] = "float32"  # the values are bfloat16 bits


def no_chunk_rows(meta, _):
    meta["attributes"]["chunk_rows"] = 0


TOKENS, SITE = "tokens.zarr", "L2/mlp_out.zarr"


@pytest.mark.parametrize(
    "array, edit, message",
    [
        (TOKENS, huge_token_rows, r"tokens.zarr/zarr.json: the array's rows 10{12}, expected 512 "),
        (TOKENS, huge_token_rows_and_provenance, r"tokens.zarr: 9765624\d\d of its 976562500 shard files"),
        (SITE, huge_width, r"json: chunks \[1024, 64\] and shards \[65536, 64\] do not span the width"),
        (SITE, huge_width_chunks_and_shards, r"json: chunks \[1024, 10{9}\] of uint16 would take over"),
        (SITE, huge_shards, r"mlp_out.zarr/zarr.json: the array's shard_rows 1099511627776, expected"),
        (
            TOKENS,
            huge_token_shards_and_provenance,
            r"tokens.zarr/c/0/0: \d+ bytes, shorter than the 1717\d+-",
        ),
        (SITE, float32_in_the_attrs, r"mlp_out.zarr/zarr.json: the array's dtype uint16, expected float32"),
        (TOKENS, no_chunk_rows, r"tokens.zarr/zarr.json: provenance chunk_rows is 0, not a size"),
    ],
)
def test_metadata_the_files_do_not_back_is_refused_before_anything_is_sized_from_it(
    tiny_pipeline, tmp_path, array, edit, message
):
    data = copy_data(tiny_pipeline.data_root, tmp_path / "data")
    store_dir = data / "activations" / "stories260K"
    edit_metadata(store_dir / array / "zarr.json", edit)
    with memory_cap(1 << 30), pytest.raises(StoreError, match=message) as e:
        ActivationStore(store_dir).site(2, "mlp_out")
    assert "\n" not in str(e.value) and str(e.value).endswith("(or mtc extract)")
