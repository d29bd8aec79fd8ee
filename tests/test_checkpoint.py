import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import dead_pid, observation, tiny_policy
from mlx.utils import tree_flatten, tree_map

from policy_core import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    load_policy,
    read_checkpoint,
    save_policy,
)
from policy_core.checkpoint import (
    FORMAT_VERSION,
    CheckpointMetadataError,
    OldCheckpointWarning,
    _header_bytes,
    remove_stale_temp_files,
    upgrade_checkpoint,
    write_safetensors_atomic,
)
from server.models import SHIPPED_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = tiny_policy(image=True)
    path = tmp_path_factory.mktemp("ckpt") / "policy.safetensors"
    sha = save_policy(policy, path, training_step=123, provenance={"test": True})
    return policy, path, sha


def _params(policy) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(policy.parameters())}


def test_round_trip_is_bit_exact(saved):
    policy, path, sha = saved
    loaded = load_policy(path)
    a, b = _params(policy), _params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    for key in policy.normalizer.features:
        for stat, value in policy.normalizer[key].arrays().items():
            assert np.array_equal(value, loaded.normalizer[key].arrays()[stat])
    assert loaded.config == policy.config
    # Observation key order survives (features are concatenated in that order).
    assert list(loaded.config.obs) == ["image", "agent_pos"]
    obs = observation(policy)
    for kind, steps in (("ddim", 5), ("ddpm", 10)):
        want = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=11)
        got = loaded.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=11)
        assert np.array_equal(want["action_pred"], got["action_pred"])


def test_metadata_document(saved):
    policy, path, sha = saved
    ckpt = read_checkpoint(path)
    doc = ckpt.metadata
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["policy_type"] == "diffusion_unet"
    assert doc["content_sha256"] == sha == ckpt.sha256
    assert doc["training_step"] == 123 and doc["provenance"] == {"test": True}
    assert doc["obs_schema"] == {
        "image": {"shape": [2, 72, 72, 3], "dtype": "uint8"},
        "agent_pos": {"shape": [2, 2], "dtype": "float32"},
    }
    assert doc["action"] == {"dim": 2, "horizon": 8, "n_action_steps": 4}
    assert doc["n_obs_steps"] == 2 and doc["control_hz"] == 10.0
    assert doc["created_at"].endswith("Z")
    # Standard safetensors: MLX's own loader reads every tensor.
    arrays = mx.load(str(path))
    assert set(arrays) == set(ckpt.tensors)


def test_ema_weights_are_served_by_default(tmp_path):
    policy = tiny_policy(image=False)
    ema = tree_map(lambda p: p * 0.5, policy.parameters())
    path = tmp_path / "ema.safetensors"
    save_policy(policy, path, ema_params=ema)
    with_ema, without = load_policy(path), load_policy(path, use_ema=False)
    for k, v in tree_flatten(ema):
        assert np.array_equal(np.array(v), _params(with_ema)[k])
        assert np.array_equal(np.array(dict(tree_flatten(policy.parameters()))[k]), _params(without)[k])


def test_bfloat16_round_trip_and_dtype_override(tmp_path):
    policy = tiny_policy(image=False, dtype="bfloat16")
    path = tmp_path / "bf16.safetensors"
    save_policy(policy, path)
    loaded = load_policy(path)
    for k, v in tree_flatten(policy.parameters()):
        got = dict(tree_flatten(loaded.parameters()))[k]
        assert got.dtype == mx.bfloat16 and mx.array_equal(v, got).item()
    as_fp32 = load_policy(path, dtype="float32")
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(as_fp32.parameters()))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "a.safetensors")
    save_policy(policy, tmp_path / "a.safetensors")  # replace in place
    with pytest.raises(ValueError, match="train"):
        save_policy(policy, tmp_path / "b.safetensors", extra_tensors={"bad": mx.zeros(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# A writer stopped after writing its temporary file, before the rename, until it is killed.
_STUCK_WRITER = """
import os, sys, time
sys.path.insert(0, "tests")
from helpers import tiny_policy
from policy_core import save_policy

def stuck(src, dst):
    print("written", flush=True)
    time.sleep(600)

os.replace = stuck
save_policy(tiny_policy(image=False), sys.argv[1])
"""


def test_temporary_files_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    policy = tiny_policy(image=False)
    writer = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WRITER, str(tmp_path / "a.safetensors")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline() == "written\n"
        live = tmp_path / f".a.safetensors.{writer.pid}.tmp"
        assert live.stat().st_size > 0
        gone = dead_pid()
        stale = tmp_path / f".b.safetensors.{gone}.tmp"  # a writer of an older version: no lock
        stale.write_bytes(b"partial")
        # A dead PID here, but the lock held: a writer in another PID namespace sharing the folder.
        foreign = tmp_path / f".c.safetensors.{gone}.tmp"
        foreign.write_bytes(b"partial")
        unrelated = [tmp_path / ".notes.tmp", tmp_path / f".d.{gone}x.tmp", tmp_path / f"e.{gone}.tmp"]
        for path in unrelated:
            path.write_bytes(b"keep")
        with open(foreign, "rb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            save_policy(policy, tmp_path / "b.safetensors")
            assert not stale.exists()
            assert live.exists() and foreign.exists()  # never a live writer's file
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        save_policy(policy, tmp_path / "b.safetensors")
        assert not live.exists() and not foreign.exists()
        assert all(path.exists() for path in unrelated)
        assert remove_stale_temp_files(tmp_path) == []
        assert remove_stale_temp_files(tmp_path / "missing") == []
        assert not (tmp_path / "a.safetensors").exists()  # the killed save never replaced anything
    finally:
        writer.kill()
        writer.wait()


def test_a_temporary_file_of_this_process_is_never_removed(tmp_path):
    mine = tmp_path / f".a.safetensors.{os.getpid()}.tmp"  # e.g. another thread's save in progress
    mine.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [] and mine.exists()


def test_unfitted_normalizer_is_refused(tmp_path):
    policy = tiny_policy(image=False)
    policy.normalizer.features.pop("action")
    with pytest.raises(ValueError, match="action"):
        save_policy(policy, tmp_path / "x.safetensors")


# ---- bad files -----------------------------------------------------------------------------------


def _rewrite(src, dst, edit_tensors=None, edit_doc=None):
    """Re-save a checkpoint with edited tensors / metadata (a valid file with different content)."""
    ckpt = read_checkpoint(src)
    tensors = dict(ckpt.tensors)
    doc = dict(ckpt.metadata)
    doc.pop("content_sha256")
    if edit_tensors:
        edit_tensors(tensors)
    if edit_doc:
        edit_doc(doc)
    write_safetensors_atomic(dst, tensors, doc)
    return dst


def test_truncated_file(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointCorruptError, match="truncated|header"):
            load_policy(bad)


def test_flipped_data_byte_fails_the_hash(saved, tmp_path):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="hash"):
        load_policy(bad)


def test_garbage_and_trailing_bytes(saved, tmp_path):
    _, path, _ = saved
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointCorruptError, match="JSON"):
        load_policy(bad)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(CheckpointCorruptError, match="trailing"):
        load_policy(trailing)


def test_missing_file():
    with pytest.raises(CheckpointError, match="cannot read"):
        load_policy("/nonexistent/policy.safetensors")


def test_plain_safetensors_is_not_a_policy(tmp_path):
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"w": mx.zeros((2, 2))})
    with pytest.raises(CheckpointVersionError, match="not a dpmlx policy checkpoint"):
        load_policy(plain)


def test_unknown_format_version(saved, tmp_path):
    _, path, _ = saved
    bad = _rewrite(path, tmp_path / "v99.safetensors", edit_doc=lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointVersionError, match="version 99"):
        load_policy(bad)


def test_unknown_policy_type(saved, tmp_path):
    _, path, _ = saved
    bad = _rewrite(
        path, tmp_path / "type.safetensors", edit_doc=lambda d: d.update(policy_type="transformer")
    )
    with pytest.raises(CheckpointVersionError, match="transformer"):
        load_policy(bad)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    _, path, _ = saved
    name = "model.unet.mid_modules.0.cond_encoder.weight"
    bad = _rewrite(path, tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(CheckpointMismatchError, match="missing.*mid_modules.0.cond_encoder.weight"):
        load_policy(bad)
    extra = _rewrite(
        path, tmp_path / "extra.safetensors", edit_tensors=lambda t: t.update({"model.foo": mx.zeros(1)})
    )
    with pytest.raises(CheckpointMismatchError, match="unexpected.*foo"):
        load_policy(extra)
    norm = _rewrite(
        path, tmp_path / "norm.safetensors", edit_tensors=lambda t: t.pop("normalizer.action.scale")
    )
    with pytest.raises(CheckpointMismatchError, match="normalizer.action.scale"):
        load_policy(norm)


def test_shape_and_dtype_mismatch(saved, tmp_path):
    _, path, _ = saved
    name = "model.unet.final_conv.1.bias"

    def reshape(t):
        t[name] = mx.zeros((3,))

    def retype(t):
        t[name] = t[name].astype(mx.float16)

    with pytest.raises(CheckpointMismatchError, match="final_conv.1.bias has shape"):
        load_policy(_rewrite(path, tmp_path / "shape.safetensors", edit_tensors=reshape))
    with pytest.raises(CheckpointMismatchError, match="final_conv.1.bias has dtype"):
        load_policy(_rewrite(path, tmp_path / "dtype.safetensors", edit_tensors=retype))


def test_config_in_metadata_is_validated(saved, tmp_path):
    _, path, _ = saved

    def break_config(doc):
        doc["config"] = {**doc["config"], "horizon": 9}

    with pytest.raises(CheckpointMismatchError, match="horizon"):
        load_policy(_rewrite(path, tmp_path / "cfg.safetensors", edit_doc=break_config))


def test_header_is_plain_json_never_pickle(saved):
    _, path, _ = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "dpmlx-policy"
    json.loads(header["__metadata__"]["dpmlx"])


# ---- metadata integrity --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A low-dimensional policy's checkpoint: small enough to rewrite a thousand times."""
    path = tmp_path_factory.mktemp("small") / "lowdim.safetensors"
    save_policy(tiny_policy(image=False), path, training_step=7, provenance={"name": "small"})
    return path


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def _as_version_1(src, dst, edit_doc=None):
    """What a format version 1 writer made of ``src``: no header hash (optionally other metadata)."""
    header_raw, data = _split(src)
    header = json.loads(header_raw)
    meta = header.pop("__metadata__")
    doc = json.loads(meta["dpmlx"]) | {"format_version": 1}
    if edit_doc:
        edit_doc(doc)
    header["__metadata__"] = {"format": meta["format"], "dpmlx": json.dumps(doc)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    dst.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return dst


def test_every_bit_of_the_header_is_covered_by_its_hash(small, tmp_path):
    raw = small.read_bytes()
    header_raw, _ = _split(small)
    doc_begin = raw.index(b'"dpmlx":"') + len(b'"dpmlx":"')
    doc_end = raw.index(b'","header_sha256"')
    rng = np.random.default_rng(0)
    bad = tmp_path / "flipped.safetensors"
    # Half the flips in the metadata document, half anywhere in the header (tensor table, hash, padding).
    positions = [*rng.integers(doc_begin, doc_end, 600), *rng.integers(8, 8 + len(header_raw), 600)]
    for position, bit in zip(positions, rng.integers(0, 8, len(positions)), strict=True):
        flipped = bytearray(raw)
        flipped[position] ^= 1 << bit
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            read_checkpoint(bad)
    # The example: another num_train_timesteps would serve other actions under the same sha256.
    edited = raw.replace(b'num_train_timesteps\\": 100', b'num_train_timesteps\\": 101')
    assert edited != raw
    bad.write_bytes(edited)
    with pytest.raises(CheckpointCorruptError, match="header_sha256 mismatch"):
        read_checkpoint(bad)


def test_version_1_files_load_with_a_warning_and_upgrade_bit_exactly(small, tmp_path):
    old = _as_version_1(small, tmp_path / "v1.safetensors")
    with pytest.warns(OldCheckpointWarning, match="not covered by a hash"):
        ckpt = read_checkpoint(old)
    assert ckpt.metadata["format_version"] == 1 and ckpt.sha256 == read_checkpoint(small).sha256
    assert upgrade_checkpoint(old) == ckpt.sha256
    _, data_before = _split(small)
    assert _split(old)[1] == data_before  # the tensors, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upgraded = read_checkpoint(old)
    assert upgraded.metadata == {**ckpt.metadata, "format_version": FORMAT_VERSION}
    no_hash = _as_version_1(small, tmp_path / "bad.safetensors", _set("content_sha256", "x" * 64))
    with pytest.warns(OldCheckpointWarning), pytest.raises(CheckpointMetadataError, match="content_sha256"):
        read_checkpoint(no_hash)


def test_the_shipped_checkpoint_is_of_the_current_version():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = read_checkpoint(SHIPPED_CHECKPOINT)
    assert ckpt.metadata["format_version"] == FORMAT_VERSION
    # Re-saved from the version 1 file: the same tensor data.
    assert ckpt.sha256 == "4949a84496c6489c44c505541a1a6108f5628aeb396262098289e14e0f853802"


def _rename(old, new):
    def edit(doc):
        doc[new] = doc.pop(old)

    return edit


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _drop(*path):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # Renamed keys: loaded before, then hello or every request failed with `internal`.
        (_rename("action", "actiom"), "missing key.*'action'.*unknown key.*'actiom'"),
        (_rename("n_obs_steps", "n_obs_stepz"), "n_obs_steps"),
        (_rename("control_hz", "control_hy"), "control_hz"),
        (_drop("created_at"), "created_at"),
        (_set("control_hz", "10"), "control_hz: '10' is not a finite number"),
        (_set("n_obs_steps", 2.0), "n_obs_steps: 2.0 is not an integer"),
        (_set("has_ema", 1), "has_ema"),
        (_set("training_step", -1), "training_step"),
        (_set("normalizer_keys", ["agent_pos"]), "normalizer_keys lacks"),
        (_set("control_hz", 20.0), "control_hz 20.0 disagrees with the config"),
        (_set("obs_schema", "agent_pos", "shape", [3, 2]), "obs_schema .* disagrees"),
        (_set("action", "dim", 3), "action .* disagrees"),
        (_set("config", "horizon", "8"), "config.horizon: '8' is not an integer"),
        (_set("config", "noise_scheduler", "clip_sample", "yes"), "clip_sample"),
        (_set("config", "shape_meta", "obs", "agent_pos", "shape", ["2"]), "shape_meta"),
        (_set("config", "obs_encoder", "num_keypoints", 3.5), "num_keypoints"),
        (_drop("config", "kernel_size"), r"config field\(s\) \['kernel_size'\]"),
        (_set("config", "extra", 1), "unknown policy config field"),
        (_set("config", "n_obs_steps", 3), "disagrees with the config"),
    ],
)
def test_inconsistent_metadata_is_refused(small, tmp_path, edit, match):
    # Version 1 files have no header hash: validation is what stands between their metadata and a robot.
    old = _as_version_1(small, tmp_path / "v1.safetensors", edit)
    with pytest.warns(OldCheckpointWarning), pytest.raises(CheckpointMetadataError, match=match):
        read_checkpoint(old)
    # A current writer is held to the same rules.
    with pytest.raises(CheckpointMetadataError, match=match):
        read_checkpoint(_rewrite(small, tmp_path / "v2.safetensors", edit_doc=edit))


def test_normalizer_statistics_must_match_their_features(small, tmp_path):
    def bad_shape(t):
        t["normalizer.action.scale"] = mx.ones(3)

    def zero_scale(t):
        t["normalizer.agent_pos.scale"] = mx.zeros(2)

    def not_finite(t):
        t["normalizer.action.offset"] = mx.array([0.0, float("nan")])

    for edit, match in (
        (bad_shape, "must be 2 finite values"),
        (zero_scale, "zeros"),
        (not_finite, "finite"),
    ):
        with pytest.raises(CheckpointMismatchError, match=match):
            load_policy(_rewrite(small, tmp_path / "n.safetensors", edit_tensors=edit))


_PEAK_RSS = """
import resource, sys
from policy_core.checkpoint import CheckpointCorruptError, read_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        read_checkpoint(path)
    except CheckpointCorruptError as e:
        print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_huge_file_is_refused_without_costing_its_size_in_memory(small, tmp_path):
    size = 2**30
    zeros = tmp_path / "zeros.safetensors"  # the case: a sparse GiB of zeros
    with open(zeros, "wb") as f:
        f.truncate(size)
    # A valid header (hash included) whose one tensor tiles a sparse GiB: only its hash can refuse it.
    doc = read_checkpoint(small).metadata
    table = {"model.x": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    header = _header_bytes(table, {**doc, "content_sha256": "0" * 64})
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(zeros), str(sparse)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    *errors, growth = result.stdout.strip().splitlines()
    assert "header" in errors[0] and "content hash mismatch" in errors[1], errors
    assert int(growth) < 64 * 2**20, f"peak RSS grew by {int(growth) / 2**20:.0f} MiB"


def test_load_into_swaps_weights_without_tracing_again(small, tmp_path):
    from policy_core.checkpoint import load_into

    mx.random.seed(9)
    other = tmp_path / "other.safetensors"
    save_policy(tiny_policy(image=False, seed=4), other)
    policy = load_policy(small)
    obs = observation(policy, batch=2)
    before = policy.predict_action(obs, seed=1)["action_pred"]
    # The compiled functions (the conditioning's, and the chunked sampler's where it ran) stay.
    traced = (policy._compiled_conditioning(), dict(policy._backends[-1]._compiled))
    assert load_into(policy, read_checkpoint(other))
    want = load_policy(other).predict_action(obs, seed=1)["action_pred"]
    assert np.array_equal(policy.predict_action(obs, seed=1)["action_pred"], want)
    assert not np.array_equal(want, before)
    assert policy._compiled_conditioning() is traced[0] and policy._backends[-1]._compiled == traced[1]
    # Another architecture is refused and changes nothing; so is a file whose tensors do not fit.
    bigger = tmp_path / "bigger.safetensors"
    save_policy(tiny_policy(image=False, down_dims=[16, 32, 64]), bigger)
    assert not load_into(policy, read_checkpoint(bigger))
    bad = _rewrite(
        other, tmp_path / "bad.safetensors", edit_tensors=lambda t: t.pop("model.unet.final_conv.1.bias")
    )
    with pytest.raises(CheckpointMismatchError, match="final_conv.1.bias"):
        load_into(policy, read_checkpoint(bad))
    assert np.array_equal(policy.predict_action(obs, seed=1)["action_pred"], want)
