"""kill -9 at several points, rerun the same command: byte-identical output."""
import pytest

from streamq.synth import write_dense

from conftest import SMALL_CAL, output_bytes, run_cli, write_recipe

# a tiny shard size forces several shards, so kills land inside and between shards
RECIPE = SMALL_CAL.replace("[run]", "[output]\nshard_size_gb = 0.00003\n[run]") + """
[quant]
scheme = "W4A16"
group_size = 32
w_sym = false
[[quant.rules]]
match = "*.mlp.down_proj"
scheme = "W8A8_DYNAMIC"
group_size = 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    model = write_dense(tmp / "m", "llama", layers=3, vocab=128)
    recipe = write_recipe(tmp / "r.toml", RECIPE)
    run_cli("run", recipe, "--model", model, "--output", tmp / "ref", check=True)
    return tmp, model, recipe, output_bytes(tmp / "ref")


KILL_POINTS = ["layer-computed:2", "tensor-written:5", "tensor-written:23", "shard-synced:3", "acts-saved:2",
               "acts-saved:5", "finalize:1"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_and_resume_is_byte_identical(setup, point):
    tmp, model, recipe, reference = setup
    out = tmp / f"out-{point.replace(':', '-')}"
    killed = run_cli("run", recipe, "--model", model, "--output", out, env={"STREAMQ_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert not (out / "quant_model_description.json").exists()
    run_cli("run", recipe, "--model", model, "--output", out, check=True)
    assert output_bytes(out) == reference
    assert not (out / ".streamq").exists()


def test_kill_twice_then_resume(setup):
    tmp, model, recipe, reference = setup
    out = tmp / "twice"
    for point in ("tensor-written:4", "tensor-written:9"):
        assert run_cli("run", recipe, "--model", model, "--output", out, env={"STREAMQ_KILL_AT": point}).returncode == -9
    run_cli("run", recipe, "--model", model, "--output", out, check=True)
    assert output_bytes(out) == reference


def test_changed_recipe_refuses_to_resume(setup):
    tmp, model, recipe, _ = setup
    out = tmp / "changed"
    run_cli("run", recipe, "--model", model, "--output", out, env={"STREAMQ_KILL_AT": "acts-saved:2"})
    other = write_recipe(tmp / "other.toml", RECIPE.replace("group_size = 32", "group_size = 16"))
    proc = run_cli("run", other, "--model", model, "--output", out)
    assert proc.returncode == 2 and "recipe.quant.group_size" in proc.stderr
    run_cli("run", other, "--model", model, "--output", out, "--restart", check=True)


def test_rerun_of_complete_output_is_a_no_op(setup):
    tmp, model, recipe, reference = setup
    proc = run_cli("run", recipe, "--model", model, "--output", tmp / "ref", check=True)
    assert "nothing to do" in proc.stderr + proc.stdout
    assert output_bytes(tmp / "ref") == reference


def test_foreign_files_are_refused_and_kept(setup):
    tmp, model, recipe, _ = setup
    out = tmp / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("run", recipe, "--model", model, "--output", out)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    run_cli("run", recipe, "--model", model, "--output", out, "--restart", check=True)
    assert (out / "notes.txt").read_text() == "mine"
