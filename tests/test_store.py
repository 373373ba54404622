"""The zarr activation store: exact round trips, held-out rows kept out, provenance checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mtc import pipeline
from mtc.store import ActivationStore, StoreError, StoreWriter, check_provenance, decode, encode, site_path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_encode_decode_round_trips_values_of_that_dtype(dtype):
    x = torch.randn(100, 7) * 50
    stored = encode(x, dtype)
    assert stored.dtype == {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
    torch.testing.assert_close(decode(stored, dtype), x.to(getattr(torch, dtype)).float(), rtol=0, atol=0)


def make_store(path, n_seq=10, ctx=8, d=4, chunk_rows=16, holdout=2, dtype="float32"):
    tokens = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx)
    writer = StoreWriter(
        path,
        {"prepend_bos": True, "n_holdout_sequences": holdout},
        tokens,
        [(0, "mlp_out")],
        d,
        dtype,
        chunk_rows,
    )
    # Activation row r holds the value r everywhere, so every read can be checked against its row index.
    rows = torch.arange(n_seq * ctx, dtype=torch.float32).reshape(n_seq, ctx, 1).expand(-1, -1, d)
    for start in range(0, n_seq, 3):  # batches that do not align with chunks
        writer.add({(0, "mlp_out"): rows[start : start + 3]})
    writer.close()
    return ActivationStore(path)


def test_rows_read_back_in_place_with_the_token_ids(tmp_path):
    store = make_store(tmp_path / "s")
    site = store.site(0, "mlp_out")
    torch.testing.assert_close(site.rows(5, 37)[:, 0], torch.arange(5, 37, dtype=torch.float32))
    assert store.tokens().shape == (10, 8) and store.chunk_rows == 16
    assert site.attrs["complete"] and site.mean_norm > 0


def test_training_batches_cover_each_training_row_once_per_epoch_and_never_holdout_or_bos(tmp_path):
    store = make_store(tmp_path / "s")
    batches = store.iter_training_batches([(0, "mlp_out")], batch_size=7, seed=0, shuffle_chunks=2)
    n_train = (10 - 2) * 8 * 7 // 8  # training windows x non-BOS positions
    seen = []
    while len(seen) < n_train // 7 * 7:
        (x,), rows = next(batches)
        torch.testing.assert_close(x[:, 0], rows.float())  # the row index travels with its values
        seen += rows.tolist()
    assert len(set(seen)) == len(seen), "no row twice within an epoch"
    assert max(seen) < store.n_train_rows, "held-out rows are never trained on"
    assert all(r % 8 != 0 for r in seen), "BOS positions are not trained on"


def test_batches_are_shuffled_across_chunks_and_reproducible(tmp_path):
    store = make_store(tmp_path / "s")
    first = [next(store.iter_training_batches([(0, "mlp_out")], 16, seed=1))[1] for _ in range(2)]
    torch.testing.assert_close(first[0], first[1])
    assert len({int(r) // store.chunk_rows for r in first[0]}) > 1


def test_holdout_iteration_reads_exactly_the_holdout_rows(tmp_path):
    store = make_store(tmp_path / "s")
    rows = torch.cat([r for _, r in store.iter_holdout([(0, "mlp_out")], 5)])
    expected = [r for r in range(store.n_train_rows, store.n_rows) if r % 8 != 0]
    assert rows.tolist() == expected


def test_incomplete_or_missing_sites_are_refused(tmp_path):
    store = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"L3/resid_mid.zarr: not in the store \(has: L0/mlp_out.zarr\)"):
        store.site(3, "resid_mid")
    arr = zarr.open_array(str(site_path(tmp_path / "s", 0, "mlp_out")), mode="r+")
    arr.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s").site(0, "mlp_out")
    with pytest.raises(StoreError, match="no activation store here"):
        ActivationStore(tmp_path / "nothing")


def test_provenance_mismatch_names_the_fields(tmp_path):
    store = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"n_holdout_sequences: store has 2, params ask 3"):
        check_provenance(store, {"prepend_bos": True, "n_holdout_sequences": 3})


def test_extracted_store_holds_real_activations_with_provenance(tiny_pipeline):
    store = pipeline.open_store(tiny_pipeline)
    p = store.provenance
    assert p["model_type"] == "stories260K" and p["context_size"] == 64 and p["prepend_bos"]
    assert p["n_tokens"] == 32768 and p["dtype"] == "bfloat16" and p["encoding"] == "bfloat16-bits"
    assert (store.tokens()[:, 0] == p["bos_token_id"]).all()
    mid, mlp = store.site(2, "resid_mid"), store.site(2, "mlp_out")
    assert mid.array.dtype == np.uint16 and mid.d_model == 64
    assert mid.mean_norm > 0 and mlp.mean_norm > 0
    x = mlp.rows(0, 256)
    assert torch.isfinite(x).all() and x.abs().sum() > 0


def test_a_store_made_from_other_params_is_refused(tiny_pipeline):
    import dataclasses

    other = dataclasses.replace(
        tiny_pipeline, dataset=dataclasses.replace(tiny_pipeline.dataset, context_size=32)
    )
    with pytest.raises(StoreError, match=r"context_size: store has 64, params ask 32"):
        pipeline.open_store(other)


def test_a_mismatch_names_every_differing_field_and_dictionary_params_never_matter(tiny_pipeline):
    import dataclasses

    other = dataclasses.replace(
        tiny_pipeline,
        dataset=dataclasses.replace(tiny_pipeline.dataset, prepend_bos=False),
        extract=dataclasses.replace(tiny_pipeline.extract, dtype="float16"),
    )
    with pytest.raises(StoreError) as e:
        pipeline.open_store(other)
    assert "prepend_bos: store has True, params ask False" in str(e.value)
    assert "dtype: store has 'bfloat16', params ask 'float16'" in str(e.value)
    tc = tiny_pipeline.dictionaries["tc"]
    retrained = dataclasses.replace(
        tiny_pipeline,
        dictionaries={
            "tc": dataclasses.replace(
                tc, dict_size=512, group_sizes=[64, 448], top_k=4, lr=0.1, batch_size=64
            )
        },
    )
    assert pipeline.open_store(retrained).n_rows == 32768


def test_a_second_extraction_into_the_same_store_fails_fast(tiny_pipeline):
    from mtc.locks import LockedError, exclusive

    with exclusive(tiny_pipeline.store_dir):
        with pytest.raises(LockedError, match="another process"):
            pipeline.extract(tiny_pipeline)
    assert pipeline.open_store(tiny_pipeline).n_rows == 32768, "the finished store is untouched"


# ------------------------------------------------------------------------------ shards, checksums, resuming
def write_rows(writer, n_seq, ctx, d, stop_window=None):
    rows = torch.arange(n_seq * ctx, dtype=torch.float32).reshape(n_seq, ctx, 1).expand(-1, -1, d)
    for start in range(0, stop_window or n_seq, 3):
        writer.add({(0, "mlp_out"): rows[start : start + 3]}, at_window=start)


def open_writer(path, n_seq=10, ctx=8, d=4):
    tokens = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx)
    return StoreWriter(
        path,
        {"prepend_bos": True, "n_holdout_sequences": 2},
        tokens,
        [(0, "mlp_out")],
        d,
        "bfloat16",
        chunk_rows=8,
        shard_rows=16,
    )


def test_arrays_are_sharded_and_every_chunk_is_checksummed(tmp_path):
    writer = open_writer(tmp_path / "s")
    write_rows(writer, 10, 8, 4)
    writer.close()
    array = ActivationStore(tmp_path / "s").site(0, "mlp_out").array
    assert array.chunks == (8, 4) and array.shards == (16, 4)
    codecs = array.metadata.to_dict()["codecs"][0]["configuration"]
    assert [c["name"] for c in codecs["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert [c["name"] for c in codecs["index_codecs"]] == ["bytes", "crc32c"]
    assert sorted(p.name for p in (tmp_path / "s" / "L0" / "mlp_out.zarr" / "c").iterdir()) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    assert not (tmp_path / "s" / "progress").exists(), "progress markers are removed once complete"


def test_a_resumed_writer_rewrites_a_half_written_shard_and_keeps_finished_ones(tmp_path):
    writer = open_writer(tmp_path / "s")
    write_rows(writer, 10, 8, 4, stop_window=6)  # windows 0-5: shards 0-2 complete
    writer._stop_thread()
    shard_file = tmp_path / "s" / "L0" / "mlp_out.zarr" / "c" / "3" / "0"
    shard_file.parent.mkdir(parents=True, exist_ok=True)
    shard_file.write_bytes(b"half a shard from a killed run")
    resumed = open_writer(tmp_path / "s")
    assert resumed.todo == [3, 4] and resumed.first_window == 6
    write_rows(resumed, 10, 8, 4)  # whole batches again; rows of finished shards are ignored
    resumed.close()
    site = ActivationStore(tmp_path / "s").site(0, "mlp_out")
    torch.testing.assert_close(site.rows(0, 80)[:, 0], torch.arange(80, dtype=torch.float32))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_damaged_chunk_is_a_one_line_error_naming_array_and_chunk(tmp_path, damage):
    writer = open_writer(tmp_path / "s")
    write_rows(writer, 10, 8, 4)
    writer.close()
    shard = tmp_path / "s" / "L0" / "mlp_out.zarr" / "c" / "1" / "0"  # rows 16..31: chunks 2 and 3
    data = bytearray(shard.read_bytes())
    if damage == "flip a byte":
        data[5] ^= 0xFF  # inside the first inner chunk of the shard
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    site = ActivationStore(tmp_path / "s").site(0, "mlp_out")
    torch.testing.assert_close(
        site.rows(0, 16)[:, 0], torch.arange(16, dtype=torch.float32)
    )  # others read fine
    with pytest.raises(StoreError) as e:
        site.rows(0, 80)
    message = str(e.value)
    assert (
        "\n" not in message
        and "L0/mlp_out.zarr: chunk 2 (rows 16..23, shard 1) is corrupt or truncated" in message
    )


def test_a_missing_shard_file_is_reported_not_read_as_zeros(tmp_path):
    writer = open_writer(tmp_path / "s")
    write_rows(writer, 10, 8, 4)
    writer.close()
    (tmp_path / "s" / "L0" / "mlp_out.zarr" / "c" / "2" / "0").unlink()
    with pytest.raises(
        StoreError, match=r"mlp_out.zarr: 1 of its 5 shard files are missing \(shard 2 first\)"
    ):
        ActivationStore(tmp_path / "s").site(0, "mlp_out")


def test_a_store_reads_the_same_through_an_fsspec_url(tmp_path):
    import fsspec

    local = make_store(tmp_path / "s")
    for url in (f"file://{tmp_path / 's'}", "memory://stores/s"):
        if url.startswith("memory"):
            fsspec.filesystem("memory").put(str(tmp_path / "s"), "/stores/s", recursive=True)
        remote = ActivationStore(url)
        assert remote.provenance == local.provenance and remote.n_rows == local.n_rows
        torch.testing.assert_close(
            remote.site(0, "mlp_out").rows(3, 40), local.site(0, "mlp_out").rows(3, 40)
        )
        np.testing.assert_array_equal(remote.tokens(), local.tokens())
        with pytest.raises(
            StoreError,
            match=r"memory://stores/s/L1/resid_mid.zarr: not in the store|"
            r"/L1/resid_mid.zarr: not in the store \(has: L0/mlp_out.zarr\)",
        ):
            remote.site(1, "resid_mid")


def test_an_error_in_the_writer_thread_reaches_the_extraction_loop(tmp_path):
    import errno

    writer = open_writer(tmp_path / "s")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer._write_shard = disk_full
    rows = torch.zeros(10, 8, 4)
    with pytest.raises(OSError, match="No space left"), writer:
        for start in range(0, 10, 2):  # the failure surfaces at a later add(), or at close()
            writer.add({(0, "mlp_out"): rows[start : start + 2]}, at_window=start)
        writer.close()
    assert not writer._thread.is_alive(), "the writer thread is stopped"
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s")


def test_training_reads_a_store_through_an_fsspec_url(tiny_pipeline, tmp_path):
    import dataclasses

    from mtc.train import train

    cfg = dataclasses.replace(
        tiny_pipeline.dictionaries["tc"], steps=5, save_every=5, save_activation_samples=False
    )
    [run_dir] = train([cfg], f"file://{tiny_pipeline.store_dir.resolve()}", tmp_path / "results")
    assert (run_dir / "dictionary.safetensors").is_file()
