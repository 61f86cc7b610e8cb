"""`qwen3-mlx bench` end to end through the real CLI, and the pieces its figures rest on."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense_config, moe_config
from mlx.utils import tree_flatten

from qwen3_mlx.bench.harness import FIGURES
from qwen3_mlx.bench.models import (
    BenchError,
    decode_read_bytes,
    predicted_weight_bytes,
    random_bench_model,
    resolve_shape,
    weight_bytes,
)


def write_config(tmp_path, cfg, moe):
    cfg = dict(cfg, model_type="qwen3_moe" if moe else "qwen3")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def run_cli(*args, timeout=120):
    # The console script's own entry point (qwen3_mlx.cli:main), in a fresh process like a user's shell.
    return subprocess.run(
        [sys.executable, "-m", "qwen3_mlx", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def check_figures(results):
    for f in FIGURES:
        s = results[f]
        assert s["min"] <= s["median"] <= s["max"], f
        assert s["min"] > 0, f
        assert len(s["trials"]) == 2


@pytest.mark.parametrize("moe,bits", [pytest.param(False, "none", marks=pytest.mark.slow), (True, "4")])
def test_bench_cli_end_to_end_vs_mlx_lm(tmp_path, moe, bits):
    cfg = moe_config(moe_intermediate_size=64) if moe else dense_config()
    config = write_config(tmp_path, cfg, moe)
    out = tmp_path / "bench.json"
    r = run_cli(
        "--shape", str(config), "--random", "--contexts", "8,20", "-g", "5", "-n", "2", "--bits", bits,
        "--vs", "mlx-lm", "--json", str(out),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "qwen3-mlx-bench/1"
    assert doc["model"]["model_type"] == cfg.get("model_type", "qwen3_moe" if moe else "qwen3")
    assert doc["model"]["bits"] == (None if bits == "none" else int(bits))
    assert doc["settings"]["gen_tokens"] == 5 and doc["settings"]["alternated"]
    assert [run["prompt_tokens"] for run in doc["runs"]] == [8, 20]
    for run in doc["runs"]:
        assert set(run["results"]) == {"qwen3-mlx", "mlx-lm"}
        for res in run["results"].values():
            check_figures(res)
        for f in FIGURES:
            assert run["ratio"][f] == pytest.approx(
                run["results"]["qwen3-mlx"][f]["median"] / run["results"]["mlx-lm"][f]["median"]
            )
    assert "ours/mlx-lm" in r.stdout
    # which kernels ran is in the JSON and the table's title
    from qwen3_mlx import kernels

    assert doc["environment"]["kernels"] == kernels.describe()
    assert ("qwen3-mlx kernels" if kernels.available() else "MLX's kernels") in " ".join(r.stdout.split())
    # and which CPU: the document and the table's title name it
    assert doc["environment"]["cpu"]["model_name"] and doc["environment"]["cpu"]["model_name"] in r.stdout


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or shutil.which("lscpu") is None,
                    reason="reads Linux's CPU description")
def test_cpu_info_names_the_processor_as_lscpu_does():
    import subprocess

    from qwen3_mlx.bench.machine import FEATURES, cpu_info

    info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                              check=True).stdout.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = cpu_info()
    assert cpu["model_name"] == info["Model name"]
    if "CPU family" in info:  # x86
        assert (cpu["family"], cpu["model"]) == (info["CPU family"], info["Model"])
    flags = set(info.get("Flags", "").split())
    assert cpu["features"] == [f for f in FEATURES if f in flags]


def test_bench_refuses_what_does_not_fit(monkeypatch):
    from qwen3_mlx.bench import core

    monkeypatch.setattr(core, "estimate_fit", _tiny_machine(core.estimate_fit))
    with pytest.raises(BenchError, match=r"does not fit: the fit planner predicts ~[\d.]+ GB .* available"):
        core.run_bench(shape="qwen3-235b-a22b", random=True, bits=4)


def _tiny_machine(estimate):
    def fake(*args, **kwargs):
        fit = estimate(*args, **kwargs)
        fit.available = 1 << 30
        return fit

    return fake


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("--shape", "qwen3-9b", "--random")
    assert r.returncode == 1
    assert "unknown shape" in r.stderr and "Traceback" not in r.stderr


def test_predicted_weight_bytes_match_the_built_model():
    """The fit estimate (computed from shapes alone) against the bytes of real random models."""
    for cfg, moe in ((dense_config(), False), (moe_config(moe_intermediate_size=64), True)):
        cfg = dict(cfg, model_type="qwen3_moe" if moe else "qwen3")
        for bits in (None, 4, 8):
            model = random_bench_model(cfg, bits, 64)
            assert predicted_weight_bytes(cfg, bits, 64) == pytest.approx(weight_bytes(model), rel=0.01), (moe, bits)


def test_decode_read_bytes_counts_active_experts_only():
    cfg = dict(moe_config(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2), model_type="qwen3_moe")
    model = random_bench_model(cfg, None, 64)
    params = dict(tree_flatten(model.parameters()))
    experts = sum(p.nbytes for k, p in params.items() if ".switch_mlp." in k)
    embed = params["model.embed_tokens.weight"]
    expected = weight_bytes(model) - experts + experts * 2 / 8 - embed.nbytes + embed.nbytes / embed.shape[0]
    assert decode_read_bytes(model, cfg) == int(expected)


def test_resolve_shape_accepts_names_and_config_paths(tmp_path):
    name, cfg = resolve_shape("Qwen/Qwen3-0.6B")
    assert name == "qwen3-0.6b" and cfg["hidden_size"] == 1024
    path = write_config(tmp_path, dense_config(), False)
    assert resolve_shape(str(path))[1]["hidden_size"] == 64
    with pytest.raises(BenchError):
        resolve_shape(str(tmp_path / "missing.json"))


def test_mlx_lm_twin_computes_the_same_logits():
    """The comparison is only fair if mlx-lm runs the very same weights: same logits, float and quantized."""
    from qwen3_mlx.bench.mlx_lm_side import mlx_lm_twin

    ids = mx.array(np.random.default_rng(0).integers(0, 1000, size=(1, 70)))
    for cfg, moe in ((dense_config(tie_word_embeddings=True), False), (moe_config(moe_intermediate_size=64), True)):
        cfg = dict(cfg, model_type="qwen3_moe" if moe else "qwen3")
        for bits in (None, 4):
            model = random_bench_model(cfg, bits, 64)
            twin = mlx_lm_twin(model)
            np.testing.assert_allclose(np.array(model(ids)), np.array(twin(ids)), atol=1e-4, rtol=0)


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path):
    config = write_config(tmp_path, dense_config(), False)
    png = tmp_path / "bench.png"
    r = run_cli("--shape", str(config), "--random", "--contexts", "8,16", "-g", "3", "-n", "1", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 1 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr
        assert not png.exists()
    else:
        assert r.returncode == 0, r.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-folder", "is-a-folder"])
def test_unwritable_output_fails_before_the_run(tmp_path, option, where):
    """A bad --json / --plot path is refused up front (one line, exit 1), not after the results were measured."""
    config = write_config(tmp_path, dense_config(), False)
    target = tmp_path / "nope" / "bench.out" if where == "missing-folder" else tmp_path
    r = run_cli("--shape", str(config), "--random", "-p", "8", "-g", "3", "-n", "1", option, str(target))
    assert r.returncode == 1, r.stderr
    assert option in r.stderr and "Traceback" not in r.stderr
    assert "trial" not in r.stderr and r.stdout == ""  # nothing was run


def test_check_output_path_accepts_a_new_file_in_an_existing_folder(tmp_path):
    from qwen3_mlx.bench import check_output_path

    assert check_output_path(tmp_path / "new.json", "--json") == tmp_path / "new.json"
    with pytest.raises(BenchError, match="does not exist"):
        check_output_path(tmp_path / "a" / "b.json", "--json")


def test_bad_group_size_for_the_shape_is_one_line(tmp_path):
    config = write_config(tmp_path, dense_config(), False)  # hidden 64: group 128 cannot divide it
    r = run_cli("--shape", str(config), "--random", "--bits", "4", "--group-size", "128", "-p", "8", "-g", "3")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot quantize this shape to 4 bits, group size 128" in lines[0] and "does not divide" in lines[0]


def test_bench_draft_against_plain_decoding(tmp_path):
    """--draft-model self-4bit on a random shape: both runs alternated, the ratio row is draft / plain, and a
    good share of the draft's proposals is kept (its own quantization often agrees on the greedy token)."""
    config = write_config(tmp_path, dense_config(head_dim=32, hidden_size=128), False)
    out = tmp_path / "bench.json"
    r = run_cli("--shape", str(config), "--random", "-p", "16", "-g", "24", "-n", "1", "--draft-model", "self-4bit",
                "--num-draft", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["speculative"] == {"draft": "self-4bit", "num_draft": 3}
    (run,) = doc["runs"]
    assert set(run["results"]) == {"qwen3-mlx", "qwen3-mlx + draft"}
    assert 0.2 < run["acceptance"] <= 1.0
    assert run["ratio"]["decode_tps"] == pytest.approx(
        run["results"]["qwen3-mlx + draft"]["decode_tps"]["median"] / run["results"]["qwen3-mlx"]["decode_tps"]["median"])
    r = run_cli("--shape", str(config), "--random", "--draft-model", "self-4bit", "--vs", "mlx-lm")
    assert r.returncode == 1 and "cannot be combined with --vs" in r.stderr
