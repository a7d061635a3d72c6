"""Nothing silently wrong: damaged shards are found, named and repaired; NaN never trains; JSON stays JSON.

Real extractions of a tiny store (64 digits through the random test backbone, 4 shards of 16
images, inner chunks of 8 images), damaged on disk the way a bad disk, a bad copy or a
hostile tester would, then driven through the real CLI.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import zarr

from protocache.cli.main import main

EXTRACT = ["extract", "--dataset", "digits", "--backbone", "test_efficientnet", "--weights", "random",
           "--limit", "64", "--shard-size", "16", "--num-workers", "0", "--no-progress"]
FIT = ["--epochs", "1", "--no-progress", "--device", "cpu"]


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def files(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "clean.zarr"
    main([*EXTRACT, "--out", str(out)])
    return out


@pytest.fixture
def store(clean, tmp_path):
    """A fresh copy of the clean store to damage."""
    return shutil.copytree(clean, tmp_path / "s.zarr")


def chunk_bytes(shard_file, chunk: int, chunks_per_shard: int = 2) -> tuple[int, int]:
    """(offset, length) of an inner chunk: from the index at the file's end (little-endian uint64
    pairs, then the index's own 4-byte CRC-32C)."""
    data = shard_file.read_bytes()
    index = np.frombuffer(data[-(16 * chunks_per_shard + 4):-4], dtype="<u8").reshape(-1, 2)
    return int(index[chunk, 0]), int(index[chunk, 1])


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def test_a_changed_chunk_is_named_by_verify_stops_fit_head_and_repair_restores_the_bytes(clean, store, tmp_path,
                                                                                          capsys):
    shard_file = store / "tokens" / "c" / "1" / "0" / "0"
    offset, length = chunk_bytes(shard_file, 1)
    data = bytearray(shard_file.read_bytes())
    data[offset + length // 2:offset + length // 2 + 16] = b"\x55" * 16  # inside chunk 1 of shard 1: rows 24..31
    shard_file.write_bytes(bytes(data))

    code, out, err = cli(capsys, "verify", store)
    assert code == 1 and "FAIL shard 1: tokens inner chunk 1 (rows 24..31): checksum mismatch" in err
    assert "--repair" in err

    code, _, err = cli(capsys, "fit-head", "infodisent", "--store", store, "--out", tmp_path / "run", *FIT)
    assert_one_line_error(code, err, "shard 1: tokens inner chunk 1 (rows 24..31)", "protocache extract", "--repair")
    assert not (tmp_path / "run" / "metrics.json").exists()
    code, _, err = cli(capsys, *EXTRACT, "--out", store)  # the quick check reads indexes, not every chunk
    assert code == 0 and "nothing to do" in err

    code, _, err = cli(capsys, *EXTRACT, "--out", store, "--repair")
    assert code == 0 and "rewriting shard 1" in err
    assert files(store) == files(clean)  # byte-identical to the clean extraction
    assert cli(capsys, "verify", store)[0] == 0


def test_a_damaged_shard_stops_evaluate_with_one_line(clean, store, tmp_path, capsys):
    # The probe reads the pooled array (one checksummed chunk per shard): fit it, then damage that array.
    assert cli(capsys, "fit-head", "linear", "--store", store, "--out", tmp_path / "run", *FIT)[0] == 0
    pooled = store / "pooled" / "c" / "3" / "0"
    data = bytearray(pooled.read_bytes())
    data[100] ^= 0xFF
    pooled.write_bytes(bytes(data))
    code, _, err = cli(capsys, "evaluate", tmp_path / "run")
    assert_one_line_error(code, err, "shard 3: pooled (rows 48..63): checksum mismatch", "--repair")
    code, _, err = cli(capsys, *EXTRACT, "--out", store)  # small arrays are checked whole even without --repair
    assert code == 0 and "rewriting shard 3" in err
    assert files(store) == files(clean)


def test_zeroed_and_truncated_shards_are_rewritten_by_a_plain_re_run(clean, store, tmp_path, capsys):
    zeroed = store / "tokens" / "c" / "2" / "0" / "0"
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    truncated = store / "tokens" / "c" / "3" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:1000])

    code, _, err = cli(capsys, "verify", store)
    assert code == 1
    assert "FAIL shard 2: tokens (rows 32..47): shard index fails its checksum" in err
    assert "FAIL shard 3: tokens (rows 48..63): shard index fails its checksum" in err

    code, _, err = cli(capsys, "fit-head", "infodisent", "--store", store, "--out", tmp_path / "run", *FIT)
    assert_one_line_error(code, err, "shard", "index fails its checksum", "--repair")

    code, _, err = cli(capsys, *EXTRACT, "--out", store)  # no --repair: the quick check finds these
    assert code == 0 and "rewriting shard 2" in err and "rewriting shard 3" in err
    assert files(store) == files(clean)


def test_nan_tokens_stop_fit_head_naming_the_rows_and_nothing_is_written(clean, store, tmp_path, capsys):
    tokens = zarr.open_group(store, mode="r+")["tokens"]
    block = tokens[21]
    block.reshape(-1)[:10] = np.nan  # ten NaN values in one image's tokens
    tokens[21] = block  # through zarr: the chunk's checksum is recomputed, so only the values are wrong
    code, _, err = cli(capsys, "verify", store)
    assert code == 1 and "FAIL shard 1: tokens: NaN or Inf values in 1 row(s): 21" in err

    code, _, err = cli(capsys, "fit-head", "infodisent", "--store", store, "--out", tmp_path / "run", *FIT)
    assert_one_line_error(code, err, "NaN or Inf", "rows 21", "--repair")
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "weights.safetensors").exists()

    code, _, err = cli(capsys, *EXTRACT, "--out", store, "--repair")  # the full pass re-extracts it
    assert code == 0 and "rewriting shard 1" in err
    assert files(store) == files(clean)


def test_a_nan_loss_stops_training_before_the_weights_move():
    import torch

    from protocache.pipeline.fit import ArraySplit, FitConfig, FitContext
    from protocache.stores.errors import ProtocacheError

    weight = torch.nn.Parameter(torch.ones(3))
    source = ArraySplit({"tokens": np.ones((8, 3), np.float32), "label": np.zeros(8, np.int64)})
    ctx = FitContext(None, None, FitConfig(progress=False), torch.device("cpu"), log=lambda m: None)
    opt = torch.optim.SGD([weight], lr=0.1)

    def step(batch, progress):  # finite for the first batch, NaN for the second
        scale = 1.0 if progress < 0.5 else math.nan
        return (weight * batch["tokens"]).sum() * scale

    with pytest.raises(ProtocacheError, match=r"the loss is nan at epoch 1, step 2.*nothing was written"):
        ctx.train("stage", source, opt, epochs=1, batch_size=4, step=step)
    assert torch.isfinite(weight).all()  # the NaN step never reached the weights


def test_json_outputs_are_strict(tmp_path):
    from protocache.stores.runs import write_json

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    write_json(tmp_path / "m.json", {"a": math.nan, "b": [np.float32("inf"), 1.0], "c": np.array([np.nan, 2.0]),
                                     "d": {"e": -math.inf, "f": "NaN"}, "g": (np.float64(0.5),)})
    loaded = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert loaded == {"a": None, "b": [None, 1.0], "c": [None, 2.0], "d": {"e": None, "f": "NaN"}, "g": [0.5]}
