"""The commands run end to end from the CLI; the download helpers resume and verify checksums (offline, against
a local HTTP server on 127.0.0.1)."""

import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, ETHANOL_TEST, SPICE_SAMPLE, data


def test_inspect_command(capsys):
    from so3lib.cli import invoke

    s = invoke(["inspect", str(SPICE_SAMPLE)])
    out = capsys.readouterr().out
    assert s["frames"] == 55 and "[spice]" in out
    # two compositions for four elements: least squares is refused and the average reference shown instead
    assert "rank 2 for 4 elements (H, C, N, Na)" in out and "per-element reference (average)" in out
    s = invoke(["inspect"])  # bundled sample by default
    assert s["frames"] == 1000


def test_md17_quick_cli_on_rmd17(tmp_path):
    from so3lib.cli import invoke

    res = invoke(
        [
            "md17",
            "--molecule",
            "ethanol",
            "--quick",
            "--max-steps",
            "30",
            "--n-atom-basis",
            "16",
            "--n-interactions",
            "1",
            "--eval-every-steps",
            "15",
            "--out",
            str(tmp_path / "q"),
            "--data-dir",
            str(BUNDLED),  # rMD17 ethanol split 01, all 1000 + 1000 frames
            "--no-progress",
        ]
    )
    r = res["rows"][0]
    assert r["n_train"] == 950 and r["n_val"] == 50 and r["test"]["n_structures"] == 1000
    assert r["energy_reference"]["method"] == "average"  # one molecule: least squares is undetermined
    table = (tmp_path / "q" / "results.md").read_text()
    assert "| ethanol |" in table and "0.4 / 2.8" in table  # our numbers beside NequIP's
    assert (tmp_path / "q" / "splits.npz").exists()


def test_md17_reads_figshare_archive_layout_and_original_md17(tmp_path):
    from so3lib.workflows import md17

    raw = np.load(data("rmd17", "rmd17_uracil_train_01.npz"))
    (tmp_path / "rmd17" / "npz_data").mkdir(parents=True)
    (tmp_path / "rmd17" / "splits").mkdir()
    np.savez(
        tmp_path / "rmd17" / "npz_data" / "rmd17_uracil.npz",
        **{k: raw[k] for k in ("nuclear_charges", "coords", "energies", "forces")},
    )
    # the archive's index files pick frames of the one npz per molecule (here the 50-frame slice)
    np.savetxt(tmp_path / "rmd17" / "splits" / "index_train_01.csv", np.arange(0, 30), fmt="%d")
    np.savetxt(tmp_path / "rmd17" / "splits" / "index_test_01.csv", np.arange(30, 50), fmt="%d")
    tr, te, src = md17.load_rmd17("uracil", 1, tmp_path)
    assert len(tr) == 30 and len(te) == 20 and "npz_data" in src
    np.testing.assert_allclose(te.energy[0], raw["energies"][30] * 0.0433641, rtol=1e-6)
    tv, test, src = md17.load_md17("ethanol", 2, data("md17"))  # 1050 frames: 1000 train + 50 test
    assert len(tv) == 1000 and len(test) == 50 and not set(tv.meta["frame"]) & set(test.meta["frame"])
    with pytest.raises(FileNotFoundError, match="download_rmd17"):
        md17.load_rmd17("aspirin", 3, tmp_path)


@pytest.mark.slow  # the default tier stays under 8 minutes on 2 cores
def test_train_cli_periodic_li_with_stress(tmp_path):
    from so3lib.cli import invoke

    res = invoke(
        [
            "train",
            "--model",
            "schnet",
            "--train",
            str(data("materials", "li_mlearn_training_every6.json")),
            "--test",
            str(data("materials", "li_mlearn_test.json")),
            "--out",
            str(tmp_path / "li"),
            "--max-steps",
            "20",
            "--batch-size",
            "8",
            "--n-atom-basis",
            "8",
            "--n-interactions",
            "1",
            "--cutoff",
            "4.0",
            "--stress-weight",
            "1.0",
            "--no-progress",
        ]
    )
    assert res["test"]["n_structures"] == 29 and np.isfinite(res["test"]["forces_mae_ev_per_a"])
    assert res["energy_reference"]["method"] == "lstsq" and res["energy_reference"]["determined"]  # Li only
    assert (tmp_path / "li" / "splits.npz").exists()
    assert len(res["padded_shapes_train"]) <= 4
    # predict: the run evaluated on a file, written as extxyz that ASE reads back
    import ase.io

    pred = invoke(
        [
            "predict",
            str(tmp_path / "li"),
            str(data("materials", "li_mlearn_test.json")),
            "--out",
            str(tmp_path / "pred.extxyz"),
            "--no-progress",
        ]
    )
    back = ase.io.read(tmp_path / "pred.extxyz", ":")
    assert len(back) == 29 and pred["metrics"]["frames"] == 29
    e = np.array([a.get_potential_energy() for a in back])
    ref = np.array([a.info["REF_energy"] for a in back])
    assert pred["metrics"]["energy_ev"]["mae"] == pytest.approx(np.mean(np.abs(e - ref)), rel=1e-9)
    assert back[0].get_stress().shape == (6,) and back[0].arrays["REF_forces"].shape == (len(back[0]), 3)


# ---------------------------------------------------------------------------------------------- downloads
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    api = b"{}"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path.startswith("/api"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.api)))
            self.end_headers()
            self.wfile.write(self.api)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_resumes_and_verifies_md5(tmp_path, server):
    from so3lib.data.download import RMD17, SPICE, Remote, download, md5_from_api

    payload = ETHANOL_TEST.read_bytes()
    md5 = hashlib.md5(payload).hexdigest()
    _RangeHandler.payload = payload
    _RangeHandler.api = json.dumps({"files": [{"name": "rmd17.tar.bz2", "computed_md5": md5}]}).encode()
    remote = Remote("rmd17.tar.bz2", (f"{server}/file",), md5_api=f"{server}/api")
    assert md5_from_api(remote) == md5
    # a partial file from an interrupted download is resumed with an HTTP Range request
    part = tmp_path / "rmd17.tar.bz2.part"
    part.write_bytes(payload[:100_000])
    path = download(remote, tmp_path, progress=False, log=lambda s: None)
    assert path.read_bytes() == payload and not part.exists()
    # a wrong checksum is an error and the bad file is removed
    with pytest.raises(ValueError, match="does not match the published"):
        download(Remote("x.bin", (f"{server}/file",), md5="0" * 32), tmp_path, progress=False, log=lambda s: None)
    assert not (tmp_path / "x.bin").exists()
    # the real public addresses and checksums
    assert RMD17.urls[0] == "https://figshare.com/ndownloader/files/23950376"
    assert RMD17.md5_api == "https://api.figshare.com/v2/articles/12672038"
    assert SPICE["1.1.4"].md5 == "f27d4c81da0e37d6547276bf6b4ae6a1" and "8222043" in SPICE["1.1.4"].urls[0]
    assert SPICE["2.0.1"].md5 == "bfba2224b6540e1390a579569b475510" and "10975225" in SPICE["2.0.1"].urls[0]


def test_download_falls_back_to_mirror_and_keeps_partial(tmp_path, server):
    from so3lib.data.download import Remote, download

    payload = bytes(range(256)) * 4000
    _RangeHandler.payload = payload
    good = Remote("y.bin", ("http://127.0.0.1:9/unreachable", f"{server}/file"), md5=hashlib.md5(payload).hexdigest())
    assert download(good, tmp_path, progress=False, log=lambda s: None, timeout=5).read_bytes() == payload
    with pytest.raises(ConnectionError, match="partial data kept"):
        download(
            Remote("z.bin", ("http://127.0.0.1:9/unreachable",)),
            tmp_path,
            progress=False,
            log=lambda s: None,
            timeout=2,
        )


def test_download_script_extracts(tmp_path, server):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        info = tarfile.TarInfo("rmd17/splits/index_train_01.csv")
        data = b"0\n1\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _RangeHandler.payload = buf.getvalue()
    import importlib.util

    spec = importlib.util.spec_from_file_location("dl", Path(__file__).parents[1] / "scripts" / "download_rmd17.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--dest", str(tmp_path), "--url", f"{server}/file", "--md5", hashlib.md5(buf.getvalue()).hexdigest()])
    assert (tmp_path / "rmd17" / "splits" / "index_train_01.csv").read_text() == "0\n1\n"
