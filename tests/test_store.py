"""The store: layout readable by xarray, never overwritten by default, one writer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specan import store
from specan.errors import StoreError, StoreExistsError, StoreLockedError
from specan.views import StoredView

VIEWS = [
    StoredView("fc.weight", "fc.weight", "linear", (6, 4)),
    StoredView("attn__q", "attn", "q_heads", (2, 8), 3),
]
KERNEL = {"backend": "torch-cpu", "top_k": 3, "vectors": True, "vector_dtype": "float32"}
SETTINGS = {"family": "auto", "layers": None, "heads": 3, "rules": None}


def fill(st: store.Store, names_steps: list[tuple[str, int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = st.reserve(
        [{"name": n, "size": 1, "mtime_ns": 1, "step": s, "epoch": None} for n, s in names_steps]
    )
    written = {}
    for name, _ in names_steps:
        res = {
            "fc.weight": store.ViewResult(
                sigma=rng.random(4, dtype=np.float32),
                U=rng.random((6, 3), dtype=np.float32),
                V=rng.random((4, 3), dtype=np.float32),
                tail=np.float32(0.5),
            ),
            "attn__q": store.ViewResult(
                sigma=rng.random((3, 2), dtype=np.float32),
                U=rng.random((3, 2, 2), dtype=np.float32),
                V=rng.random((3, 8, 2), dtype=np.float32),
                tail=np.zeros(3, dtype=np.float32),
            ),
        }
        st.write_row(rows[name], res)
        st.mark_done(name)
        written[name] = res
    return written


def test_round_trip_sorted_by_step(tmp_path: Path) -> None:
    st = store.create(tmp_path / "s.zarr", views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    written = fill(st, [("b", 20), ("a", 10)])
    assert [e["name"] for e in st.done_rows()[1]] == ["a", "b"]
    sigma = st.read_sigma("fc.weight")
    np.testing.assert_array_equal(sigma[0], written["a"]["fc.weight"].sigma)
    np.testing.assert_array_equal(sigma[1], written["b"]["fc.weight"].sigma)
    U, V = store.open_store(tmp_path / "s.zarr").read_vectors("attn__q")
    assert U.shape == (2, 3, 2, 2) and V.shape == (2, 3, 8, 2)
    np.testing.assert_array_equal(V[1], written["b"]["attn__q"].V)
    assert store.open_store(tmp_path / "s.zarr").views["attn__q"].k == 2  # clamped to R


def test_xarray_reads_the_store_with_dimension_names(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    st = store.create(tmp_path / "s.zarr", views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    written = fill(st, [("a", 0), ("b", 5)])
    root = xr.open_zarr(tmp_path / "s.zarr", consolidated=False, zarr_format=3)
    assert root["step"].dims == ("checkpoint",)
    assert list(root["step"].values) == [0, 5]
    ds = xr.open_zarr(tmp_path / "s.zarr", group="views/attn__q", consolidated=False)
    assert ds["sigma"].dims == ("checkpoint", "head", "rank")
    assert ds["U"].dims == ("checkpoint", "head", "row", "component")
    assert ds["V"].dims == ("checkpoint", "head", "col", "component")
    np.testing.assert_array_equal(ds["sigma"].values[1], written["b"]["attn__q"].sigma)


def test_create_never_overwrites_by_default(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = store.create(path, views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    fill(st, [("a", 0)])
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        store.create(path, views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    assert store.summary(path)["checkpoints"]["done"] == 1
    store.create(path, views=VIEWS, kernel=KERNEL, settings=SETTINGS, overwrite=True)
    assert store.summary(path)["checkpoints"]["done"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no temp folders left


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with store.lock(path):
        with pytest.raises(StoreLockedError, match="being written"):
            with store.lock(path):
                pass
    assert not Path(str(path) + ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    import socket

    Path(str(path) + ".lock").write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()})
    )
    with store.lock(path):
        assert json.loads(Path(str(path) + ".lock").read_text())["pid"] == os.getpid()


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="specan ingest"):
        store.open_store(tmp_path / "missing.zarr")
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(StoreError, match="not a specan store"):
        store.summary(tmp_path / "x.zarr")
    (tmp_path / "x.zarr" / "zarr.json").write_text("{half")
    with pytest.raises(StoreError, match="zarr.json"):
        store.read_attrs(tmp_path / "x.zarr")


def test_summary_lists_views_and_sizes(tmp_path: Path) -> None:
    st = store.create(tmp_path / "s.zarr", views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    fill(st, [("a", 3), ("b", 7)])
    s = store.summary(tmp_path / "s.zarr")
    assert s["checkpoints"]["first_step"] == 3 and s["checkpoints"]["last_step"] == 7
    assert [v["key"] for v in s["views"]] == ["attn__q", "fc.weight"]  # model order: fc is output
    assert all(v["bytes"] > 0 for v in s["views"]) and s["bytes"] > 0


def test_a_view_group_opens_with_its_steps_in_xarray_alone(tmp_path: Path) -> None:
    st = store.create(tmp_path / "s.zarr", views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    written = fill(st, [("a", 0), ("b", 5)])
    assert _row_order(tmp_path / "s.zarr") == {"fc.weight": "step", "attn__q": "step"}
    written |= fill(st, [("c", 2)], seed=1)  # appended later, a step between the others
    assert _row_order(tmp_path / "s.zarr") == {"fc.weight": "ingestion", "attn__q": "ingestion"}
    code = (  # plain xarray in a fresh interpreter: specan is never imported
        "import json, sys, xarray as xr\n"
        "ds = xr.open_zarr(sys.argv[1], group='views/fc.weight', consolidated=False)\n"
        "s = ds.sigma.swap_dims(checkpoint='step').sortby('step')\n"
        "assert 'specan' not in sys.modules\n"
        "print(json.dumps({'dims': s.dims, 'raw': ds.sigma.step.values.tolist(),\n"
        "                  'step': s.step.values.tolist(), 'sigma': s.values.tolist()}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s.zarr")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["dims"] == ["step", "rank"] and got["raw"] == [0, 5, 2]  # rows as ingested
    assert got["step"] == [0, 2, 5]
    expect = [written[n]["fc.weight"].sigma.tolist() for n in ("a", "c", "b")]
    np.testing.assert_allclose(got["sigma"], expect)


# The views attribute as specan wrote it before views carried typed facts (commit a3a6ddc), for
# the shapes below: new stores must write the same JSON and read it back to the same facts.
SCHEMA1_VIEWS = json.loads((Path(__file__).parent / "data" / "views-schema1.json").read_text())
_LLAMA = "model.layers.0.self_attn."
_PLANS: dict[str, tuple[dict, dict]] = {
    "vgg": ({"features.0.weight": (8, 3, 3, 3), "up.deconv.weight": (8, 4, 2, 2),
             "embed.weight": (10, 6), "fc.weight": (5, 6)}, {"family": "vgg"}),
    "lstm": ({**{f"rnn.weight_{k}_l{n}{r}": (16, 8 if (k, n) == ("ih", 1) else 3 + (k == "hh"))
                 for n in (0, 1) for r in ("", "_reverse") for k in ("ih", "hh")},
              "out.weight": (5, 8)}, {}),
    "attn4": ({"layers.0.self_attn.in_proj_weight": (24, 8),
               "layers.0.self_attn.out_proj.weight": (8, 8)}, {"heads": 4}),
    "attn_nohead": ({"layers.0.self_attn.in_proj_weight": (24, 8),
                     "layers.0.self_attn.out_proj.weight": (8, 8)}, {}),
    "neox2": ({"gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
               "gpt_neox.layers.0.attention.dense.weight": (8, 8)}, {"heads": 2}),
    "neox_nohead": ({"gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
                     "gpt_neox.layers.0.attention.dense.weight": (8, 8)}, {}),
    "gpt2": ({"h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_proj.weight": (8, 8),
              "h.0.mlp.c_fc.weight": (8, 32)}, {"heads": 2}),
    "gpt2_nohead": ({"h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_proj.weight": (8, 8),
                     "h.0.mlp.c_fc.weight": (8, 32)}, {"family": "gpt2"}),
    "llama": ({_LLAMA + "q_proj.weight": (8, 8), _LLAMA + "k_proj.weight": (4, 8),
               _LLAMA + "v_proj.weight": (4, 8), _LLAMA + "o_proj.weight": (8, 8)}, {"heads": 4}),
    "llama_nohead": ({_LLAMA + "q_proj.weight": (8, 8), _LLAMA + "k_proj.weight": (4, 8),
                      _LLAMA + "v_proj.weight": (4, 8), _LLAMA + "o_proj.weight": (8, 8)}, {}),
}  # fmt: skip


def _planned(case: str) -> list[StoredView]:
    from specan.views import plan_views

    shapes, kw = _PLANS[case]
    return [StoredView(s.key, s.param, s.rule, s.shape, s.heads, s.facts, param_shape=(1, 2))
            for s in plan_views(shapes, **kw)]  # fmt: skip


def _without_nulls(info: dict) -> dict:
    return {k: v for k, v in info.items() if v is not None}


@pytest.mark.parametrize("case", sorted(_PLANS))
def test_view_facts_keep_the_stores_json(tmp_path: Path, case: str) -> None:
    """Typed facts change nothing a store holds: a new store's ``views`` attribute is what
    specan wrote before (a ``"heads": null`` left out, which reads the same), and an older
    store's attribute reads back to the facts the planner gives."""
    old = SCHEMA1_VIEWS[case]
    views = _planned(case)
    assert [v.key for v in views] == list(old)
    spath = tmp_path / "s.zarr"
    store.create(spath, views=views, kernel=KERNEL, settings=SETTINGS)
    written = json.loads((spath / "zarr.json").read_text())["attributes"]["views"]
    # k is the store's own choice (top_k, at most the view's rank); all else is the same JSON
    assert {key: {**v, "k": None} for key, v in written.items()} == {
        key: {**v, "k": None, "info": _without_nulls(v["info"])} for key, v in old.items()
    }
    # the older JSON, nulls and all, in the store: read back to the planned facts
    meta = json.loads((spath / "zarr.json").read_text())
    meta["attributes"]["views"] = old
    (spath / "zarr.json").write_text(json.dumps(meta))
    read = store.open_store(spath).views
    assert [(v.key, v.facts, v.param_shape) for v in read.values()] == [
        (v.key, v.facts, (1, 2)) for v in views
    ]


def test_unknown_view_facts_are_refused_by_name(tmp_path: Path) -> None:
    spath = tmp_path / "s.zarr"
    store.create(spath, views=VIEWS, kernel=KERNEL, settings=SETTINGS)
    meta = json.loads((spath / "zarr.json").read_text())
    meta["attributes"]["views"]["fc.weight"]["info"]["colour"] = "red"
    (spath / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(
        StoreError, match=r"s\.zarr: view 'fc\.weight': unknown view facts \['colour'\]"
    ):
        _ = store.open_store(spath).views


def _row_order(spath: Path) -> dict[str, str]:
    views = json.loads((spath / "zarr.json").read_text())["attributes"]["views"]
    return {
        key: json.loads((spath / "views" / key / "zarr.json").read_text())["attributes"].get(
            "row_order"
        )
        for key in views
    }


def test_a_store_ingested_out_of_order_reads_in_step_order_with_xarray_alone(
    tmp_path: Path,
) -> None:
    """A checkpoint that lands after a later one (a watch catching it late, a re-ingest adding
    it) is appended, not inserted: the view groups say so in ``row_order``, plain xarray sorts
    by the ``step`` coordinate, and the API is in step order already."""
    from safetensors.numpy import save_file

    import specan

    rng = np.random.default_rng(7)
    raw = {
        s: {"fc.weight": rng.standard_normal((6, 4)).astype(np.float32)} for s in (0, 10, 20, 30)
    }
    run = tmp_path / "run"
    run.mkdir()

    def land(*steps: int) -> None:
        for s in steps:
            save_file(raw[s], str(run / f"step-{s:04d}.safetensors"), {"step": str(s)})
        specan.ingest(run, top_k=2, workers=1)

    land(0, 20)
    assert set(_row_order(run / store.STORE_NAME).values()) == {"step"}
    land(10)  # late: an earlier step after a later one
    land(30)  # in order again; the rows stay out of order
    assert set(_row_order(run / store.STORE_NAME).values()) == {"ingestion"}
    code = (  # plain xarray in a fresh interpreter: specan is never imported
        "import json, sys, xarray as xr\n"
        "ds = xr.open_zarr(sys.argv[1], group='views/fc.weight', consolidated=False)\n"
        "s = ds.sortby('step')\n"
        "assert 'specan' not in sys.modules\n"
        "print(json.dumps({'order': ds.attrs['row_order'], 'raw': ds.step.values.tolist(),\n"
        "                  'step': s.step.values.tolist(), 'sigma': s.sigma.values.tolist()}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(run / store.STORE_NAME)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["order"] == "ingestion" and got["raw"] == [0, 20, 10, 30]
    assert got["step"] == [0, 10, 20, 30]
    expect = [np.linalg.svd(raw[s]["fc.weight"].astype(np.float64), compute_uv=False)
              for s in (0, 10, 20, 30)]  # fmt: skip
    np.testing.assert_allclose(got["sigma"], expect, rtol=1e-5)
    api = specan.open(run).sigma("fc.weight")
    assert api.step.values.tolist() == [0, 10, 20, 30]
    np.testing.assert_allclose(api.values, expect, rtol=1e-5)
