"""experiments/bench_kernels.py in its --smoke mode: both suites, numeric TFLOP/s for ours and the
xla / ragged_dot baselines, ratios = ours / baseline, the markdown and json written."""
import json

import jax
import pytest

from helpers import experiment_module

bench = experiment_module("bench_kernels")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_kernels")
    lines = []
    result = bench.main(["--smoke", "--out_dir", str(out_dir)], log=lines.append)
    return result, out_dir, "\n".join(lines)


def test_smoke_rows_numbers_and_ratios(smoke):
    result, _, _ = smoke
    rows = result["rows"]
    # attention: full + causal at one (S, D), two passes each; gmm: one shape, two passes
    assert [(r["suite"], r["pass"]) for r in rows] == [("attention", "fwd"), ("attention", "fwd+bwd")] * 2 + [
        ("gmm", "fwd"), ("gmm", "fwd+bwd")]
    for r in rows:
        main_baseline = "xla" if r["suite"] == "attention" else "ragged_dot"
        assert r["flops"] > 0
        for cell in (r["ours"], r["baselines"][main_baseline]):
            assert "error" not in cell, cell
            assert cell["tflops"] > 0 and cell["ms"] > 0
            assert cell["tflops"] == pytest.approx(r["flops"] / (cell["ms"] * 1e-3) / 1e12)
        for name, base in r["baselines"].items():
            if "tflops" in base:
                assert r["ratios"][name] == pytest.approx(r["ours"]["tflops"] / base["tflops"])
            else:
                assert r["ratios"][name] is None and base["error"]
    fwd, both = rows[0], rows[1]  # fwd+bwd counts 3.5x the forward FLOPs, causal half of full
    assert both["flops"] == pytest.approx(3.5 * fwd["flops"])
    assert rows[2]["flops"] == pytest.approx(fwd["flops"] / 2)
    assert rows[5]["flops"] == pytest.approx(3 * rows[4]["flops"])  # gmm fwd+bwd = 3x fwd


def test_smoke_files_and_table(smoke):
    result, out_dir, printed = smoke
    kind = bench.slug(jax.devices()[0].device_kind)
    md, js = out_dir / f"bench_kernels_{kind}_smoke.md", out_dir / f"bench_kernels_{kind}_smoke.json"
    assert result["files"] == [str(md), str(js)]
    text = md.read_text()
    assert text.strip() in printed
    saved = json.loads(js.read_text())
    assert saved["meta"]["jax"] == jax.__version__ and saved["meta"]["smoke"] is True
    assert saved["meta"]["device_kind"] == jax.devices()[0].device_kind
    assert len(saved["rows"]) == len(result["rows"])
    for suite, heading, base in (("attention", "## Attention", "xla"), ("gmm", "## Grouped matmul", "ragged_dot")):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("| ")]
        header, body = table[0], table[1:]
        assert f"| ours TFLOP/s | {base} TFLOP/s | ours/{base} |" in header
        assert len(body) == sum(r["suite"] == suite for r in result["rows"])
        col = header.split(" | ").index(f"ours/{base}")
        for line, row in zip(body, (r for r in result["rows"] if r["suite"] == suite)):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[:2] == [row["shape"], row["pass"]]
            assert float(cells[2]) > 0 and float(cells[3]) > 0
            assert cells[col] == f"{row['ratios'][base]:.2f}x"


def test_refuses_real_sizes_on_cpu(tmp_path):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("only CPU refuses")
    with pytest.raises(SystemExit, match="--smoke"):
        bench.main(["--suite", "gmm", "--out_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_flag_parsing():
    args = bench.parse_args(["--seq_lens", "1024,4096", "--head_dims", "128", "--gmm_shapes", "64x32x4x16,8x8x2x8"])
    assert args.seq_lens == (1024, 4096) and args.head_dims == (128,) and args.iters == 20
    assert args.gmm_shapes == ((64, 32, 4, 16), (8, 8, 2, 8))
    smoke = bench.parse_args(["--smoke", "--iters", "3"])
    assert smoke.iters == 3 and smoke.seq_lens == (256,) and smoke.warmup == 1
    cases = bench.attention_cases((1024, 16384), (64, 128), 16384, smoke=False)
    assert {(c.batch, c.heads, c.kv_heads, c.head_dim) for c in cases} == {
        (16, 32, 4, 64), (16, 16, 2, 128), (1, 32, 4, 64), (1, 16, 2, 128)}
