"""Curvature and batch-size drawings rendered to exact strings."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.curvature import (
    DensityMap,
    batch_chart,
    batch_table,
    bin_average,
    density_chart,
    density_map,
    gradient_tests_chart,
    sequential,
    topk_chart,
    trace_chart,
)
from tests.stiffmon.tui.test_renderables import render


def curvature_store() -> Store:
    """One run with two density measurements, trace, top-3 spectra and gradient tests."""
    store = Store()
    msgs: list[p.Message] = [
        p.Hello(run="r", seq=0, step=0, t=0.0, name="sgd", batch_size=64),
    ]
    grid = np.linspace(-1.0, 4.0, 101)
    for i, step in enumerate((0, 100)):
        dens = np.exp(-0.5 * ((grid - 0.0) / 0.1) ** 2) + 0.1 * (i + 1) * np.exp(
            -0.5 * ((grid - 3.0) / 0.1) ** 2
        )
        msgs.append(
            p.Curve(
                run="r",
                seq=len(msgs),
                step=step,
                t=float(step),
                name="hessian-density",
                x=grid,
                y=dens,
                attrs={
                    "runs": 2,
                    "steps": 32,
                    "sigma": 0.1,
                    "hvps": 72,
                    "trace": 12.5 + i,
                    "trace_stderr": 0.5,
                },
            )
        )
        names = (
            "curvature/trace",
            "curvature/trace_stderr",
            "noise/norm_test",
            "noise/inner_product_test",
            "noise/orthogonality_test",
            "noise/suggested_batch/norm_test",
            "noise/suggested_batch/inner_product_test",
            "noise/suggested_batch/orthogonality_test",
            "noise/theta/norm_test",
            "noise/theta/inner_product_test",
            "noise/theta/orthogonality_test",
        )
        vals = (12.5 + i, 0.5, 2.0, 0.5, 3.0, 300.0 + i, 20.4, 17.0, 0.9, 0.9, 5.84)
        msgs.append(
            p.Scalars(
                run="r", seq=len(msgs), step=step, t=float(step), names=names, values=np.array(vals)
            )
        )
        msgs.append(
            p.Spectrum(
                run="r",
                seq=len(msgs),
                step=step,
                t=float(step),
                name="hessian",
                values=np.array([3.0 + i, 2.0, 1.0]),
            )
        )
    store.extend(msgs)
    return store


def test_bin_average_is_exact_for_piecewise_linear() -> None:
    grid = np.array([0.0, 1.0, 2.0])
    dens = np.array([0.0, 1.0, 0.0])  # a triangle of mass 1
    edges = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    got = bin_average(grid, dens, edges)
    np.testing.assert_allclose(got, [0.0, 0.25, 0.75, 0.5, 0.0])
    # a peak narrower than a bin is not lost
    fine = np.linspace(0, 1, 1001)
    spike = np.where(np.abs(fine - 0.5) < 0.002, 100.0, 0.0)
    coarse = bin_average(fine, spike, np.linspace(0, 1, 5))
    assert coarse[1] > 0.3 and coarse[0] == 0.0


def test_density_map_ascii_exact() -> None:
    grid = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    low = np.array([1.0, 1.0, 1e-9, 1e-9, 1e-9])  # mass at the bottom
    high = np.array([1e-9, 1e-9, 1e-9, 1.0, 1.0])  # then at the top
    dm = DensityMap([0, 50, 100], [grid] * 3, [low, low, high], ascii=True, height=4, decades=2)
    # bins of width 1: a full bin is the max ('@'), a half-filled one 10^-0.3 ('%')
    assert render(dm, 20) == (
        "4       @@@\n3       %%%\n2 %%%%%%   \n0 @@@@@@   \n  step 0 100\n  1e-2xmax   .:-=+*#\n"
    )
    assert "no density measurement yet" in render(DensityMap([], [], []), 40)
    # more measurements than columns: thinned, the last kept
    many = DensityMap(list(range(100)), [grid] * 100, [low] * 99 + [high], ascii=True, height=2)
    first = render(many, 12).splitlines()[0]
    assert first.endswith("@") and len(first) == 12


def test_density_chart_and_batch_table_exact() -> None:
    rd = curvature_store().runs["r"]
    assert render(density_chart(rd, 0, log_y=False, ascii=True, height=10), 60) == (
        "density 1/2, step 0 - sgd                                   \n"
        "  1 |           **                                          \n"
        "    |          ***                                          \n"
        "0.5 |          * **                                         \n"
        "    |         ** **                                         \n"
        "    |         *   **                            **          \n"
        "  0 |**********    *****************************************\n"
        "    +-----------+--------------------+---------------------+\n"
        "                0                    2                     4\n"
        "trace 12.5 +- 0.5, sigma 0.1, SLQ 2x32, 72 HVPs\n"
    )
    latest = render(density_chart(rd, None, log_y=True, ascii=True, height=10), 60)
    assert latest.startswith("density 2/2, step 100 - sgd") and "trace 13.5" in latest
    assert render(batch_table([(rd, "red")]), 120) == (
        "actual B → suggested by norm/inner/ortho (θ)\nsgd: 64 → 301/21/17 (θ 0.9/0.9/5.84)\n"
    )
    assert render(batch_table([(rd, "red")], ascii=True), 30) == (  # the numbers first
        "actual B -> suggested by norm/\nsgd: 64 -> 301/21/17 (theta 0.\n"
    )


def test_time_series_charts() -> None:
    rd = curvature_store().runs["r"]
    kw = {"x_time": False, "ascii": True, "height": 8}
    trace = render(trace_chart([(rd, "red")], log_y=False, **kw), 60)
    assert trace.startswith("Hessian trace (Hutchinson), grey: +-2 standard errors")
    assert "14 |" in trace and "12 |" in trace  # the band reaches 13.5 + 2·0.5 and 12.5 − 1
    topk = render(topk_chart(rd, log_y=False, **kw), 60)
    assert topk.startswith("top-3 Hessian eigenvalues - sgd") and "4 |" in topk
    tests = render(gradient_tests_chart(rd, log_y=True, **kw), 80)
    assert "gradient tests" in tests and "- - -" in tests  # dashed chosen θ
    batch = render(batch_chart([(rd, "red")], "norm_test", **kw), 60)
    assert batch.startswith("suggested batch (norm test), dashed: actual")
    assert "100 |" in batch and "- - -" in batch  # log axis; actual batch 64 dashed
    empty = curvature_store()
    empty.runs["r"].curves.clear()
    assert "no density yet" in render(
        density_chart(empty.runs["r"], None, log_y=False, ascii=True, height=8), 40
    )
    assert "no density measurement yet" in render(
        density_map(empty.runs["r"], ascii=True, height=8), 40
    )
    empty.runs["r"].finished = True  # it will never come: not "yet"
    ended = render(density_chart(empty.runs["r"], None, log_y=False, ascii=True, height=8), 60)
    assert "no density in this run (density_every)" in ended and "yet" not in ended
    assert "no density measured in this run" in render(
        density_map(empty.runs["r"], ascii=True, height=8), 40
    )


def test_sequential_colours() -> None:
    assert sequential(0.0) == "#440154" and sequential(1.0) == "#fde725"
    assert sequential(float("nan")) == "#303030"
