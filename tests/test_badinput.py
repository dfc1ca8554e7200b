"""Bad input: a clear message naming the file/tensor/key, exit code 2, no output that looks complete."""
import errno
import io
import json

import pytest
from safetensors.torch import load_file, save_file

from streamq import cli
from streamq.synth import write_dense

from conftest import SMALL_CAL, run_cli, write_recipe


@pytest.fixture
def sharded(tmp_path):
    return write_dense(tmp_path / "m", "llama", layers=2, vocab=128, shard_mb=0.05)


def run_and_expect(recipe, model, out, *needles):
    proc = run_cli("run", recipe, "--model", model, "--output", out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert "hint:" in proc.stderr
    assert not (out / "quant_model_description.json").exists()
    return proc


def shard_holding(model, name):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def test_missing_shard(sharded, recipe_w8a8_dynamic, tmp_path):
    victim = shard_holding(sharded, "model.layers.1.mlp.up_proj.weight")
    victim.unlink()
    run_and_expect(recipe_w8a8_dynamic, sharded, tmp_path / "out", victim.name, "missing")


def test_truncated_shard(sharded, recipe_w8a8_dynamic, tmp_path):
    victim = shard_holding(sharded, "model.layers.1.mlp.up_proj.weight")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    run_and_expect(recipe_w8a8_dynamic, sharded, tmp_path / "out", victim.name, "truncated")


def test_corrupt_header(sharded, recipe_w8a8_dynamic, tmp_path):
    victim = shard_holding(sharded, "model.layers.0.mlp.up_proj.weight")
    data = bytearray(victim.read_bytes())
    data[8:20] = b"#garbage#!!!"
    victim.write_bytes(bytes(data))
    run_and_expect(recipe_w8a8_dynamic, sharded, tmp_path / "out", victim.name, "corrupt")


def rewrite_tensor(model, name, fn):
    path = shard_holding(model, name)
    tensors = load_file(path)
    tensors[name] = fn(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape(sharded, recipe_w8a8_dynamic, tmp_path):
    rewrite_tensor(sharded, "model.layers.1.mlp.up_proj.weight", lambda t: t[:-1].clone())
    run_and_expect(recipe_w8a8_dynamic, sharded, tmp_path / "out", "model.layers.1.mlp.up_proj.weight", "shape")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(sharded, recipe_w8a8_dynamic, tmp_path, bad):
    def poison(t):
        t = t.clone()
        t[3, 5] = bad
        return t
    rewrite_tensor(sharded, "model.layers.1.self_attn.v_proj.weight", poison)
    run_and_expect(recipe_w8a8_dynamic, sharded, tmp_path / "out", "model.layers.1.self_attn.v_proj.weight", "NaN or Inf")


def test_unknown_recipe_key_suggests(tmp_path, sharded):
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nschme = "W8A8_DYNAMIC"\n')
    run_and_expect(recipe, sharded, tmp_path / "out", "quant.schme", "did you mean 'scheme'")


def test_unknown_scheme(tmp_path, sharded):
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nscheme = "W8A8_DYNAMC"\n')
    run_and_expect(recipe, sharded, tmp_path / "out", "W8A8_DYNAMC", "W8A8_DYNAMIC")


def test_unimplemented_option_is_an_error(tmp_path, sharded):
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nnonuniform = true\n')
    run_and_expect(recipe, sharded, tmp_path / "out", "nonuniform", "not implemented")
    recipe = write_recipe(tmp_path / "r3.toml", SMALL_CAL + '[quant]\nco_sparse = true\n')
    run_and_expect(recipe, sharded, tmp_path / "out", "co_sparse", "not implemented")


def test_group_size_must_divide(tmp_path, sharded):
    recipe = write_recipe(tmp_path / "r.toml", SMALL_CAL + '[quant]\nscheme = "W4A16"\ngroup_size = 48\n')
    run_and_expect(recipe, sharded, tmp_path / "out", "group_size 48", "model.layers.0.")


def test_unwritable_output(tmp_path, sharded, recipe_w8a8_dynamic):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("run", recipe_w8a8_dynamic, "--model", sharded, "--output", blocker / "out")
    assert proc.returncode == 2 and str(blocker / "out") in proc.stderr and "hint:" in proc.stderr


class FullDisk(io.FileIO):
    """A file on a disk that fills after a budget of bytes."""
    budget = 20000

    def write(self, b):
        FullDisk.budget -= len(b)
        if FullDisk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_disk_full_while_writing_a_shard(tmp_path, sharded, recipe_w8a8_dynamic, monkeypatch, capsys):
    import streamq.shards
    monkeypatch.setattr(streamq.shards, "open", lambda p, mode="r": FullDisk(p, mode.replace("b", "")), raising=False)
    out = tmp_path / "out"
    code = cli.main(["run", str(recipe_w8a8_dynamic), "--model", str(sharded), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and ".partial" in err and "free disk space" in err
    assert not (out / "quant_model_description.json").exists()
    assert not list(out.glob("*.safetensors"))
    # after freeing space, the same command resumes and completes
    monkeypatch.undo()
    assert cli.main(["run", str(recipe_w8a8_dynamic), "--model", str(sharded), "--output", str(out)]) == 0
    assert run_cli("verify", out).returncode == 0
