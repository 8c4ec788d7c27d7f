"""experiments/rl_joint_vs_single.py without training: the arms' command lines (each from the SFT run, the
same steps; single RL on the family alone, SFT on its task alone), the changes from the start and the
verdict on the report's interference claim, both ways, and the report table."""
import pytest

from helpers import experiment_module

jvs = experiment_module("rl_joint_vs_single")
FAMILIES = ["shapes/count", "shapes/colour", "shapes/position"]


def _args(tmp_path, *more):
    return jvs.parse_args(["--sft_run=/runs/sft", "--steps=7", f"--workdir={tmp_path}",
                           f"--families={','.join(FAMILIES)}", "--extra=--config.data.seq_len=96", *more])


def test_arm_commands(tmp_path):
    args = _args(tmp_path)
    joint, single, sft = (jvs.arm_command(a, args, tmp_path / a) for a in jvs.ARMS)
    for cmd in (joint, single, sft):
        assert "--config.init_from=/runs/sft:=" in cmd and "--config.total_steps=7" in cmd
        assert "--config.data.seq_len=96" in cmd and "--config.eval_every=0" in cmd
    assert "--config=configs/rl.py:tiny" in joint and f"--config.rl.families={','.join(FAMILIES)}" in joint
    assert "--config.rl.families=shapes/count" in single
    assert "--config=configs/vlm_sft.py:tiny" in sft and "--config.data.sft.tasks=count" in sft
    with pytest.raises(SystemExit):
        _args(tmp_path, "--family=shapes/ocr")  # not among --families


def _scores(start, **arms):
    return {"sft_start": dict(zip(FAMILIES, start)), **{a: dict(zip(FAMILIES, v)) for a, v in arms.items()}}


@pytest.mark.parametrize("sft_others, rl_less", [((0.3, 0.1), True), ((0.6, 0.5), False)])
def test_changes_and_verdict(sft_others, rl_less, tmp_path):
    scores = _scores((0.5, 0.4, 0.2), joint_rl=(0.7, 0.5, 0.3), single_rl=(0.9, 0.35, 0.2),
                     single_sft=(0.8, *sft_others))
    ch = jvs.compare(scores, "shapes/count", FAMILIES)
    assert ch["joint_rl"]["target"] == pytest.approx(0.2) and ch["joint_rl"]["improved"] == 3
    assert ch["single_rl"]["others"] == pytest.approx(-0.025)
    assert ch["single_sft"]["others"] == pytest.approx((sft_others[0] - 0.4 + sft_others[1] - 0.2) / 2)
    text = jvs.verdict(ch, "shapes/count", answers_per_family=4096)
    assert ("RL interfered less than SFT" in text) == rl_less and "3 of 3 families" in text
    assert ("did not interfere less" in text) == (not rl_less)
    assert "no verdict at this scale" in jvs.verdict(ch, "shapes/count", answers_per_family=8)  # within noise
    for s in scores.values():
        s["all"] = sum(s.values()) / 3
    table = jvs.report(dict(scores=scores, changes=ch, families=FAMILIES, verdict=text,
                            settings=vars(_args(tmp_path)), wall_s=1.0))
    assert "| shapes/colour | 0.400 | 0.500 | 0.350 |" in table and "| single_rl | +0.400 | -0.025 | 1 / 3 |" in table
