"""The alpha-beta cost model: fits recover known parameters; projections behave."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.studies import costmodel as cm
from bench.studies import costmodel_inputs as cmi
from tests.output_checks import is_png


def synthetic(
    model: str,
    alpha: float,
    beta: float,
    *,
    gamma: float = 0.0,
    noise: float = 0.0,
    ranks=(2, 4, 8),
    seed: int = 0,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in ranks:
        for k in range(2, 25, 2):
            n = 2**k
            t = cm.predict(model, p, n, alpha, beta, gamma) * (1 + noise * rng.standard_normal())
            rows.append({"backend": "mpi", "ranks": p, "bytes": n, "time_us": t * 1e6})
    return rows


def samples(rows: list[dict]) -> list[cmi.Sample]:
    return [cmi.Sample(r["backend"], r["ranks"], r["bytes"], r["time_us"] / 1e6) for r in rows]


@pytest.mark.parametrize("model", cm.MODELS)
def test_fit_recovers_alpha_beta_exactly(model):
    alpha, beta = 2.5e-6, 1 / 12.5e9  # 2.5 us, 100 Gb/s
    fit = cm.fit(samples(synthetic(model, alpha, beta)), model)
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    assert fit.bandwidth_gbps == pytest.approx(100.0, rel=1e-6)
    assert all(e["max_rel"] < 1e-6 for e in fit.errors.values())
    assert sorted(fit.errors) == ["2", "4", "8"]


def test_fit_with_noise_and_gamma():
    alpha, beta, gamma = 4e-6, 2e-10, 5e-11
    rows = synthetic("ring", alpha, beta, gamma=gamma, noise=0.02, seed=3)
    fit = cm.fit(samples(rows), "ring", with_gamma=False)
    # Without gamma the reduction cost folds into beta: (2 beta + gamma) / 2 per byte factor.
    assert fit.beta_s_per_byte == pytest.approx(beta + gamma / 2, rel=0.05)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.15)
    assert 0.005 < max(e["mean_rel"] for e in fit.errors.values()) < 0.1


def test_wrong_model_shows_larger_error():
    rows = samples(synthetic("ring", 20e-6, 1e-10))
    right = cm.fit(rows, "ring")
    wrong = cm.fit(rows, "rabenseifner")
    assert (
        max(e["mean_rel"] for e in wrong.errors.values())
        > 10 * max(e["mean_rel"] for e in right.errors.values()) + 0.01
    )


def test_fit_refuses_too_little_data():
    with pytest.raises(cmi.CostModelError, match="at least 2"):
        cm.fit([cmi.Sample("mpi", 1, 8, 1e-6), cmi.Sample("mpi", 2, 8, 1e-6)], "ring")


def test_load_allreduce_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"backend": "mpi", "ranks": 2, "time_us": 3.0}]))
    with pytest.raises(cmi.CostModelError, match=r"bad\.json: row 0 has no bytes"):
        cmi.load_allreduce([bad])
    ok = tmp_path / "ok.json"
    # exactly what bench.allreduce --json writes: a list of rows
    ok.write_text(
        json.dumps(
            [
                {
                    "backend": "mpi",
                    "ranks": 4,
                    "bytes": 1024,
                    "count": 256,
                    "dtype": "float32",
                    "time_us": 20.0,
                    "algbw_gbps": 0.05,
                    "busbw_gbps": 0.08,
                }
            ]
        )
    )
    (s,) = cmi.load_allreduce([ok])
    assert (s.ranks, s.bytes, s.time_s, s.backend) == (4, 1024, 2e-5, "mpi")


def test_projection_weak_and_strong():
    base = cmi.Measured(
        norm="bn",
        ranks=1,
        mode="weak",
        step_s=0.010,
        compute_s=0.010,
        allreduce_s=0.0,
        samples_per_s=3200.0,
        efficiency=1.0,
        grad_bytes=4 << 20,
    )
    rows = cm.project(base, [1, 16, 1024], model="ring", alpha=2e-6, beta=cm.target_beta(200))
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    effs = [r["efficiency"] for r in rows]
    assert effs == sorted(effs, reverse=True) and effs[-1] < 1.0
    # 2(p-1)/p * 4 MiB at 25 GB/s plus latency, exactly
    p = 1024
    expect = 2 * (p - 1) * 2e-6 + 2 * (p - 1) / p * (4 << 20) * 8 / 200e9
    assert rows[-1]["allreduce_s"] == pytest.approx(expect)
    strong = cm.project(
        cmi.Measured(**{**base.__dict__, "mode": "strong"}),
        [1, 16],
        model="ring",
        alpha=2e-6,
        beta=cm.target_beta(200),
    )
    assert strong[1]["compute_s"] == pytest.approx(0.010 / 16)
    assert strong[1]["efficiency"] < rows[1]["efficiency"]  # strong scaling suffers more


def test_cli_writes_outputs(tmp_path):
    data = tmp_path / "ar.json"
    data.write_text(json.dumps(synthetic("rabenseifner", 3e-6, 1e-10)))
    scaling = tmp_path / "sc"
    scaling.mkdir()
    (scaling / "scaling.csv").write_text(
        "ranks,norm,mode,samples_per_s,efficiency,steps,step_s,allreduce_s,imbalance_wait_s,"
        "grad_bytes\n1,gn,weak,1000,1,10,0.32,0,0,400000\n2,gn,weak,1800,0.9,10,0.36,0.03,0.01,"
        "400000\n"
    )
    out = tmp_path / "cm"
    assert (
        cm.main(
            [
                "--allreduce",
                str(data),
                "--scaling",
                str(scaling),
                "--out",
                str(out),
                *"--alpha-us 1 --bandwidth-gbps 200 --ranks 16 1024".split(),
            ]
        )
        == 0
    )
    result = json.loads((out / "costmodel.json").read_text())
    assert result["fits"]["rabenseifner"]["alpha_s"] == pytest.approx(3e-6, rel=1e-6)
    nets = {(r["network"], r["model"], r["ranks"]) for r in result["projections"]}
    assert ("target", "ring", 1024) in nets and ("measured", "rabenseifner", 2) in nets
    assert is_png(out / "costmodel.png")
    md = (out / "costmodel.md").read_text()
    assert "| ring |" in md and "Projected scaling" in md
    assert not math.isnan(result["projections"][-1]["efficiency"])
