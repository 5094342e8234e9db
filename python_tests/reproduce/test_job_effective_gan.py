"""`landscape-kernels reproduce effective-gan` end to end (--quick), its transition and its checks."""
import json
import math

import pytest

from landscape_kernels.cli import main
from landscape_kernels.reproduce.effective_gan import checks, parse_variant, transition
from testing import assert_report_and_resume


def test_effective_gan_quick_run_reports_every_part_and_resumes(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["reproduce", "effective-gan", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    p = s["phases"]
    assert p["disc_lrs"] == [1e-4, 1e-3] and p["phis"] == [0.0, 0.01, 0.1, 0.9]
    assert len(p["final_diversity"]) == 2 and all(len(row) == 4 for row in p["final_diversity"])
    assert p["records"]["step"] == list(range(0, 201, 25))
    for row in p["final_diversity"] + p["final_diversity_targets"]:
        assert all(v is None or 0 <= v <= math.log(100) + 1e-9 for v in row)
    assert len(p["transitions"]) == 2
    variant = s["discriminator"]["variants"][0]
    assert (variant["activation"], variant["hidden"]) == ("tanh", 32)
    d = s["damping"]
    assert [r["penalty"] for r in d["rows"]] == [0.0, 0.3, 1.0, 3.0, 10.0]
    assert all(r["fit"] is None or r["fit"]["r2"] <= 1 for r in d["rows"])
    assert (out / "particles_phases.pt").is_file() and (out / "particles_discriminator0.pt").is_file()
    _, again = assert_report_and_resume(
        "effective-gan", out, ["mode-collapse transition", "intermediate gradient penalty"],
        ["fig_phase_diagram.png", "fig_diversity.png", "fig_particles.png", "fig_damping.png"], capsys)
    assert again["phases"] == s["phases"] and again["damping"] == s["damping"]


def test_bad_settings_are_one_clear_error(tmp_path, capsys):
    base = ["reproduce", "effective-gan", "--out", str(tmp_path / "g")]  # refused before anything runs
    assert main(base + ["--phis", "0,0.5,1.0"]) == 2 and "phis must be increasing values in [0, 1)" in capsys.readouterr().err
    assert main(base + ["--variants", "swish-8"]) == 2 and "ACTIVATION-WIDTH" in capsys.readouterr().err
    assert main(base + ["--parts", "discriminator"]) == 2 and "run both" in capsys.readouterr().err
    assert main(base + ["--quick", "--targets", "5000"]) == 2 and "targets (--targets)" in capsys.readouterr().err


def test_transition_interpolates_and_says_when_it_is_off_the_grid():
    phis = [0.0, 0.01, 0.1, 0.9]
    assert transition(phis, [1.0, 2.0, 3.0, 4.0], 2.5) == pytest.approx(0.01 * 10 ** 0.5)
    assert transition(phis, [1.0, 3.0, 3.0, 4.0], 2.0) == pytest.approx(0.005)  # linear from φ = 0
    assert transition(phis, [3.0, 3.0, 3.0, 4.0], 2.0) == "below grid"
    assert transition(phis, [1.0, 1.0, None, 1.5], 2.0) == "above grid"
    assert parse_variant("sin-64") == ("sin", 64)
    with pytest.raises(ValueError, match="ACTIVATION-WIDTH"):
        parse_variant("relu")


def _grid(activation, transitions):
    return {"activation": activation, "hidden": 128, "disc_lrs": [1e-4, 1e-3, 1e-2], "phis": [0.0, 0.01, 0.1, 0.9],
            "transitions": transitions}


def _damping(times, zetas):
    return {"rows": [{"penalty": g, "convergence_step": t, "fit": None if z is None else {"damping_ratio": z}}
                     for g, t, z in zip([0, 0.1, 1, 10], times, zetas)]}


def test_checks_hold_and_fail_on_their_numbers():
    results = {"phases": _grid("relu", [0.02, 0.05, "above grid"]),
               "discriminator": {"variants": [_grid("tanh", [0.005, 0.01, 0.3]), _grid("sin", [0.1, 0.3, "above grid"])]},
               "damping": _damping([900, 400, 200, 800], [0.3, 0.6, 1.2, 2.0])}
    held = [c["holds"] for c in checks(results)]
    assert held == [True, True, True, True, True, True]
    results["phases"]["transitions"] = ["below grid", "below grid", 0.05]  # mostly off the grid
    results["discriminator"]["variants"][1]["transitions"] = ["below grid", "below grid", 0.04]  # sin like relu
    results["damping"] = _damping([900, 400, 800, 200], [1.2, 0.6, 0.9, 2.0])  # fastest at the end, no oscillation
    held = [c["holds"] for c in checks(results)]
    assert held == [False, True, False, False, False, False]
