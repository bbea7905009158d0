"""HDF5 packing, validation and per-rank reading, on real files."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hpcaccel.data import RankReader, eval_batches, open_dataset, scan, write_file
from hpcaccel.data.sources import digits_split, pack_builtin
from hpcaccel.errors import UsageError


def indexed(path, n, chunk=8, classes=5):
    """x[i] holds i everywhere, so a batch tells which samples it contains."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    y = np.arange(n) % classes
    write_file(str(path), [x], [y], n, (3,), classes, "test", chunk_rows=chunk)
    return open_dataset(str(path))


def ids(x):
    return x[:, 0].int().tolist()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_read_disjoint_parts_with_matching_labels(tmp_path, world, shuffle):
    ds = indexed(tmp_path / "d.h5", 203)
    seen = []
    for rank in range(world):
        reader = RankReader(ds, rank, world, batch=10, shuffle=shuffle, seed=4)
        batches = list(reader.epoch(1))
        assert len(batches) == reader.steps == 203 // (10 * world)
        for x, y in batches:
            assert x.shape == (10, 3) and x.dtype.is_floating_point
            assert (y.numpy() == np.array(ids(x)) % 5).all()  # labels travel with samples
            seen += ids(x)
    assert len(seen) == len(set(seen)) == reader.steps * 10 * world


def test_resume_mid_epoch_gives_the_remaining_batches(tmp_path):
    ds = indexed(tmp_path / "d.h5", 100)
    reader = RankReader(ds, 1, 2, batch=6, shuffle=True, seed=9)
    full = [ids(x) for x, _ in reader.epoch(3)]
    assert [ids(x) for x, _ in reader.epoch(3, start_step=4)] == full[4:]


def test_reader_stops_cleanly_when_abandoned(tmp_path):
    ds = indexed(tmp_path / "d.h5", 500)
    it = RankReader(ds, 0, 1, batch=2, shuffle=False, seed=0, prefetch=1).epoch(0)
    next(it)
    it.close()  # the background thread must not stay blocked on a full queue


def test_eval_covers_all_samples_across_ranks(tmp_path):
    ds = indexed(tmp_path / "d.h5", 37)
    got = [i for r in range(4) for x, _ in eval_batches(ds, r, 4, 5) for i in ids(x)]
    assert got == list(range(37))


def test_pack_cli_npz_shards_and_info(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 2, 4)).astype(np.float32)
    y = np.arange(50) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "hpcaccel.data", "pack", "--source", str(tmp_path / "a.npz"),
           "--out", str(out), "--shards", "3"]
    subprocess.run(cmd, check=True, capture_output=True)
    index = json.loads((out / "index.json").read_text())
    assert [f["samples"] for f in index["files"]] == [16, 17, 17]
    ds = open_dataset(str(out / "index.json"))
    assert ds.samples == 50 and ds.sample_shape == (2, 4) and ds.classes == 3
    reader = RankReader(ds, 0, 1, batch=50, shuffle=False, seed=0)
    (bx, by), = list(reader.epoch(0))  # reads across the three files in order
    np.testing.assert_array_equal(bx.numpy(), x)
    np.testing.assert_array_equal(by.numpy(), y)
    info = subprocess.run([sys.executable, "-m", "hpcaccel.data", "info", str(out / "index.json")],
                          check=True, capture_output=True, text=True).stdout
    assert "50 samples in 3 file(s)" in info


def test_pack_cli_bad_input_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcaccel.data", "pack", "--source",
                        str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o.h5")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.npz" in r.stderr


def test_synthetic_source_is_learnable_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCACCEL_DATA", str(tmp_path))
    a = pack_builtin("synthetic", 300, (2, 3), 4, 1)
    with h5py.File(a[0]) as f:
        x, y = f["x"][...], f["y"][...]
    assert x.shape == (300, 2, 3) and set(np.unique(y)) <= set(range(4))
    assert len(np.unique(y)) > 1
    (tmp_path / "again").mkdir()
    monkeypatch.setenv("HPCACCEL_DATA", str(tmp_path / "again"))
    with h5py.File(pack_builtin("synthetic", 300, (2, 3), 4, 1)[0]) as f:
        np.testing.assert_array_equal(f["x"][...], x)


def test_digits_split_is_fixed_and_real():
    (xt, yt), (xv, yv) = digits_split()
    assert len(xt) + len(xv) == 1797 and len(xv) == 360
    assert xt.shape[1:] == (1, 8, 8) and 0 <= xt.min() and xt.max() <= 1
    assert set(yt) == set(range(10))


def bad_file(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("hello"), "not an HDF5 file"),
    (lambda p: bad_file(p, x=np.zeros((3, 2))), "no dataset 'y'"),
    (lambda p: bad_file(p, x=np.zeros((3, 2)), y=np.zeros(4, int)), "x has 3 samples but y has 4"),
    (lambda p: bad_file(p, x=np.zeros((3, 2)), y=np.array([b"a"] * 3)), "integer labels or float"),
    (lambda p: bad_file(p, x=np.zeros((3, 2)), y=np.float64(1)), "y must be"),
    (lambda p: bad_file(p, x=np.zeros((0, 2)), y=np.zeros(0, int)), "empty"),
    (lambda p: bad_file(p, x=np.array([b"a", b"b"]), y=np.zeros(2, int)), "x must be"),
])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, make, needle):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(UsageError, match=needle) as e:
        open_dataset(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_labels_out_of_range(tmp_path):
    write_file(str(tmp_path / "l.h5"), [np.zeros((4, 2))], [np.array([0, 1, 2, 7])], 4, (2,), 3, "t")
    with pytest.raises(UsageError, match="label 7 of sample 3 out of range"):
        scan(open_dataset(str(tmp_path / "l.h5")))


@pytest.mark.parametrize("world", [1, 3])
def test_scan_finds_nan_in_any_rank_share(tmp_path, world):
    x = np.zeros((30, 2), np.float32)
    x[25, 1] = np.nan
    write_file(str(tmp_path / "n.h5"), [x], [np.zeros(30)], 30, (2,), 3, "t")
    ds = open_dataset(str(tmp_path / "n.h5"))
    errors = []
    for rank in range(world):
        try:
            scan(ds, rank, world, block_bytes=40)  # several blocks per rank
        except UsageError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "sample 25 contains NaN or inf" in errors[0]


def test_inconsistent_shards(tmp_path):
    write_file(str(tmp_path / "a.h5"), [np.zeros((4, 2))], [np.zeros(4)], 4, (2,), 3, "t")
    write_file(str(tmp_path / "b.h5"), [np.zeros((4, 5))], [np.zeros(4)], 4, (5,), 3, "t")
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "hpcaccel-shards", "version": 1,
        "files": [{"path": "a.h5", "samples": 4}, {"path": "b.h5", "samples": 4}]}))
    with pytest.raises(UsageError, match="differ"):
        open_dataset(str(tmp_path / "index.json"))
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "hpcaccel-shards", "version": 1, "files": [{"path": "a.h5", "samples": 5}]}))
    with pytest.raises(UsageError, match="lists 5"):
        open_dataset(str(tmp_path / "index.json"))


def pack_cli(*args, umask=None):
    return subprocess.run([sys.executable, "-m", "hpcaccel.data", "pack", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def test_pack_refuses_an_existing_output_without_overwrite(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((12, 2), np.float32), y=np.arange(12) % 2)
    np.savez(tmp_path / "b.npz", x=np.ones((12, 2), np.float32), y=np.arange(12) % 2)
    out = tmp_path / "d.h5"
    assert pack_cli("--source", tmp_path / "a.npz", "--out", out).returncode == 0
    r = pack_cli("--source", tmp_path / "b.npz", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"--out {out}: already exists" in r.stderr and "--overwrite" in r.stderr
    assert open_dataset(str(out)).samples == 12 and h5py.File(out)["x"][0, 0] == 0  # untouched
    assert pack_cli("--source", tmp_path / "b.npz", "--out", out, "--overwrite").returncode == 0
    assert h5py.File(out)["x"][0, 0] == 1
    # shards: a directory holding a packed dataset is refused; --overwrite replaces it,
    # dropping the shards a smaller pack no longer has
    shards = tmp_path / "s"
    assert pack_cli("--source", tmp_path / "a.npz", "--out", shards, "--shards", 3).returncode == 0
    r = pack_cli("--source", tmp_path / "a.npz", "--out", shards, "--shards", 2)
    assert r.returncode == 2 and "already holds a packed dataset" in r.stderr
    assert pack_cli("--source", tmp_path / "a.npz", "--out", shards, "--shards", 2,
                    "--overwrite").returncode == 0
    assert sorted(p.name for p in shards.iterdir()) == ["index.json", "part-00000.h5", "part-00001.h5"]
    assert open_dataset(str(shards / "index.json")).samples == 12


def test_pack_warns_about_integer_samples_and_labels_from_one(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 1, 3, 3)).astype(np.uint8)
    np.savez(tmp_path / "img.npz", x=pixels, y=np.arange(20) % 4 + 1)  # labels 1..4
    r = pack_cli("--source", tmp_path / "img.npz", "--out", tmp_path / "raw.h5")
    assert r.returncode == 0
    warnings = r.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("hpcaccel.data: warning: ") for w in warnings)
    assert "x is uint8 (values 0 to 255)" in warnings[0] and "--normalize" in warnings[0]
    assert "labels run from 1 to 4, packed as 5 classes with class 0 empty" in warnings[1]
    assert open_dataset(str(tmp_path / "raw.h5")).classes == 5
    # --normalize scales 8-bit values into [0, 1]; --classes given: the labels are deliberate
    r = pack_cli("--source", tmp_path / "img.npz", "--out", tmp_path / "n.h5", "--normalize",
                 "--classes", 5)
    assert r.returncode == 0 and r.stderr == ""
    np.testing.assert_allclose(h5py.File(tmp_path / "n.h5")["x"][...], pixels / 255, rtol=1e-6)
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 2), np.float32), y=np.arange(4) % 2)
    r = pack_cli("--source", tmp_path / "f.npz", "--out", tmp_path / "f.h5", "--normalize")
    assert r.returncode == 2 and "--normalize: x of --source" in r.stderr and "float32" in r.stderr


def test_the_labels_from_one_advice_names_a_pack_option_that_works(tmp_path):
    """Both warnings (pack's, and train's start-up advice) name --label-offset; following
    the advice packs labels 1..4 as 0..3 in 4 classes, with no warning."""
    from hpcaccel.advice import data_warnings

    y = np.arange(20) % 4 + 1
    np.savez(tmp_path / "a.npz", x=np.zeros((20, 2), np.float32), y=y)
    r = pack_cli("--source", tmp_path / "a.npz", "--out", tmp_path / "raw.h5")
    assert r.returncode == 0 and "add --label-offset 1 to start them at 0" in r.stderr, r.stderr
    (advice,) = data_warnings({"min_label": 1}, 5, "--data", "raw.h5")
    assert "`python -m hpcaccel.data pack ... --label-offset 1`" in advice
    r = pack_cli("--source", tmp_path / "a.npz", "--out", tmp_path / "shifted.h5", "--label-offset", 1)
    assert r.returncode == 0 and r.stderr == ""
    np.testing.assert_array_equal(h5py.File(tmp_path / "shifted.h5")["y"][...], y - 1)
    assert open_dataset(str(tmp_path / "shifted.h5")).classes == 4
    npz = tmp_path / "a.npz"
    for args, needle in [((npz, "--label-offset", 2), "--label-offset 2: label 1 of --source"),
                         ((npz, "--label-offset", -1), "--label-offset -1: must be 0 or more"),
                         (("synthetic", "--label-offset", 1), "--label-offset: the synthetic")]:
        r = pack_cli("--out", tmp_path / "bad.h5", "--source", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "bad.h5").exists()


def test_info_errors_name_the_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcaccel.data", "info", str(tmp_path / "none.h5")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"hpcaccel.data: error: info {tmp_path / 'none.h5'}: no such file\n"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_packed_files_follow_the_umask(tmp_path, umask):
    np.savez(tmp_path / "a.npz", x=np.zeros((12, 2), np.float32), y=np.arange(12) % 2)
    assert pack_cli("--source", tmp_path / "a.npz", "--out", tmp_path / "one.h5", umask=umask).returncode == 0
    assert pack_cli("--source", tmp_path / "a.npz", "--out", tmp_path / "s", "--shards", 2,
                    umask=umask).returncode == 0
    for path in [tmp_path / "one.h5", *(tmp_path / "s").iterdir()]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_no_abbreviated_flags(tmp_path):
    r = pack_cli("--sourc", "digits", "--out", tmp_path / "d.h5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--sourc" in r.stderr
    assert not (tmp_path / "d.h5").exists()
    r = subprocess.run([sys.executable, "-m", "hpcaccel.bench", "predict", "--grad-mb", "1",
                        "--compute", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("hpcaccel.bench: error: ") and r.stderr.count("\n") == 1


def test_write_blocks_takes_a_stream_of_blocks(tmp_path):
    from hpcaccel.data import write_blocks
    blocks = ((np.full((5, 2), i, np.float32), np.full(5, i)) for i in range(4))  # a generator
    write_blocks(str(tmp_path / "g.h5"), blocks, 20, (2,), 4, "t")
    with h5py.File(tmp_path / "g.h5") as f:
        assert f["y"][...].tolist() == [i for i in range(4) for _ in range(5)]
    with pytest.raises(ValueError, match="expected 21 samples, got 20"):
        write_blocks(str(tmp_path / "h.h5"), iter([(np.zeros((20, 2)), np.zeros(20))]), 21, (2,), 4, "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]  # no temp file left behind


# -- targets other than one class label per sample -------------------------------------------

@pytest.mark.parametrize("y,kind,shape,classes", [
    (np.arange(12) % 3, "class labels", (), 3),
    (np.linspace(0, 1, 12, dtype=np.float64), "float targets", (), 0),
    (np.arange(36, dtype=np.float32).reshape(12, 3), "float targets", (3,), 0),
    (np.arange(12 * 8).reshape(12, 2, 4) % 4, "labels per element", (2, 4), 4),
])
def test_targets_of_any_shape_are_written_read_and_described(tmp_path, y, kind, shape, classes):
    x = np.random.default_rng(0).standard_normal((12, 2, 4)).astype(np.float32)
    write_file(str(tmp_path / "t.h5"), [x], [y], 12, (2, 4), classes, "t", chunk_rows=5)
    ds = open_dataset(str(tmp_path / "t.h5"))
    assert (ds.target.kind, ds.target_shape, ds.classes) == (kind, shape, classes)
    (bx, by), = list(RankReader(ds, 0, 1, batch=12, shuffle=False, seed=0).epoch(0))
    assert by.dtype == (torch.int64 if ds.target.integer else torch.float32)
    np.testing.assert_array_equal(by.numpy(), y.astype(by.numpy().dtype))
    np.testing.assert_array_equal(bx.numpy(), x)
    stats = scan(ds)
    assert ("min_label" in stats) == ds.target.integer


def test_scan_checks_what_fits_the_target(tmp_path):
    x = np.zeros((6, 2), np.float32)
    y = np.ones((6, 3), np.float32)
    y[4, 1] = np.nan
    write_file(str(tmp_path / "f.h5"), [x], [y], 6, (2,), 0, "t")
    with pytest.raises(UsageError, match="the target of sample 4 contains NaN or inf"):
        scan(open_dataset(str(tmp_path / "f.h5")))
    y = np.zeros((6, 2, 2), np.int64)
    y[3, 1, 0] = 5
    write_file(str(tmp_path / "s.h5"), [x], [y], 6, (2,), 4, "t")
    with pytest.raises(UsageError, match=r"label 5 of sample 3 \(an element\) out of range \[0, 4\)"):
        scan(open_dataset(str(tmp_path / "s.h5")))
    # float targets have no range: any finite value fits
    write_file(str(tmp_path / "ok.h5"), [x], [np.full(6, -1e3, np.float32)], 6, (2,), 0, "t")
    assert scan(open_dataset(str(tmp_path / "ok.h5")))["y_count"] == 6


def test_pack_float_and_per_element_targets_and_info(tmp_path, capsys):
    from hpcaccel.data.__main__ import main as data_main  # in process: the CLI is tested above
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=rng.standard_normal((40, 2)))
    np.savez(tmp_path / "seg.npz", x=rng.standard_normal((40, 1, 4, 4)), y=rng.integers(0, 3, (40, 4, 4)))
    np.savez(tmp_path / "cnt.npz", x=x, y=np.arange(40) % 7)
    for args in (["--source", "reg.npz", "--out", "reg", "--shards", "2"],
                 ["--source", "seg.npz", "--out", "seg.h5"],
                 ["--source", "cnt.npz", "--out", "cnt.h5", "--y-dtype", "float32"]):
        assert data_main(["pack", *(str(tmp_path / a) if a.endswith(("npz", "h5", "reg")) else a
                                    for a in args)]) == 0
    reg = open_dataset(str(tmp_path / "reg" / "index.json"))
    assert reg.target.kind == "float targets" and reg.target_shape == (2,) and reg.classes == 0
    index = json.loads((tmp_path / "reg" / "index.json").read_text())
    assert index["target_shape"] == [2] and index["target_dtype"] == "float32"
    seg = open_dataset(str(tmp_path / "seg.h5"))
    assert seg.target.kind == "labels per element" and seg.target_shape == (4, 4) and seg.classes == 3
    assert open_dataset(str(tmp_path / "cnt.h5")).target.kind == "float targets"
    capsys.readouterr()
    assert data_main(["info", str(tmp_path / "reg" / "index.json")]) == 0
    assert data_main(["info", str(tmp_path / "seg.h5")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "y: float targets of shape (2,)" in lines[0]
    assert "y: labels per element of shape (4, 4), 3 classes" in lines[1]
    # float targets have no classes or label offset; NaN targets are refused
    np.savez(tmp_path / "nan.npz", x=x, y=np.where(np.arange(40) == 9, np.nan, 1.0))
    for extra, source, needle in ((["--classes", "3"], "reg.npz", "holds float targets"),
                                  (["--label-offset", "1"], "reg.npz", "holds float targets"),
                                  ([], "nan.npz", "target of sample 9 is NaN")):
        code = data_main(["pack", "--source", str(tmp_path / source), "--out",
                          str(tmp_path / "bad.h5"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, err


def test_diabetes_is_embedded_split_and_standardised(tmp_path, monkeypatch):
    from sklearn.datasets import load_diabetes

    from hpcaccel.data.sources import diabetes_arrays, diabetes_split
    x, y = diabetes_arrays()
    reference = load_diabetes(scaled=False)  # the embedded copy is scikit-learn's data
    # Equal to the last bit is not promised: scikit-learn's text parsing differs across its
    # versions by one ulp in a few values.
    np.testing.assert_allclose(x, reference.data, rtol=1e-12, atol=0)
    np.testing.assert_allclose(y, reference.target, rtol=1e-12, atol=0)
    (xt, yt), (xv, yv) = diabetes_split()
    assert (len(xt), len(xv)) == (353, 89) and xt.shape[1] == 10
    assert abs(float(yt.mean())) < 1e-6 and abs(float(yt.std()) - 1) < 1e-5
    monkeypatch.setenv("HPCACCEL_DATA", str(tmp_path))
    train, test = (open_dataset(p) for p in pack_builtin("diabetes", 0, (), 0, 0))
    assert (train.samples, test.samples, train.sample_shape) == (353, 89, (10,))
    assert train.target.kind == "float targets" and train.target_shape == ()


def test_unscaled_float_targets_get_a_start_up_warning(tmp_path):
    """The scan's per-rank sums merged: targets around 150 +- 77 (the diabetes data as
    measured) warn, standardised ones do not."""
    from hpcaccel.advice import data_warnings, merge_stats

    y = np.random.default_rng(0).normal(150, 77, 100).astype(np.float32)
    write_file(str(tmp_path / "raw.h5"), [np.zeros((100, 2))], [y], 100, (2,), 0, "t")
    ds = open_dataset(str(tmp_path / "raw.h5"))
    merged = merge_stats([scan(ds, r, 3) for r in range(3)])
    assert merged["y_count"] == 100
    (line,) = data_warnings(merged, 0, "--data", "raw.h5")
    assert "float targets have mean 15" in line and "standardise them" in line
    standard = {**merged, "y_sum": 0.0, "y_sumsq": 100.0}
    assert data_warnings(standard, 0, "--data", "raw.h5") == []
