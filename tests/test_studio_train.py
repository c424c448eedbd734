"""Training from the browser: the token on the routes that change anything, uploads that cannot write
outside the work folder or unpack without bound, a whole upload -> train -> serve cycle with a training
process of its own (including one that fails and one that is cancelled), the studio's disk (uploads by
content, kept to the newest, refused when full) and the job's limits (priority, memory, budget, the
server's end)."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagegen.serve import create_app
from imagegen.serve import jobs

from conftest import LOCAL, chromium, live_server, run_main, serve_process

TOKEN = "a-test-token-0123"


def png(seed: int, side: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name in links:                      # a symbolic link member, as `zip --symlinks` writes one
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def tiny_folder_zip(n: int = 24) -> bytes:
    return zip_bytes({f"{cls}/img{i}.png": png(i + 100 * k) for k, cls in enumerate(("cats", "dogs")) for i in range(n // 2)})


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def client(served):
    with TestClient(create_app(served, log=None, token=TOKEN), base_url=LOCAL) as c:
        yield c


def upload(client, data: bytes, token: str | None = TOKEN):
    headers = {} if token is None else {"X-Imagegen-Token": token}
    return client.post("/api/upload", files={"archive": ("data.zip", data, "application/zip")}, headers=headers)


def everything_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_the_routes_that_change_anything_need_the_token(client):
    data = tiny_folder_zip(4)
    assert upload(client, data, token=None).status_code == 401
    r = upload(client, data, token="wrong-token-000")
    assert r.status_code == 403 and "wrong token" in r.json()["detail"]
    for path, body in (("/api/train", {"upload": "0" * 16}), ("/api/train/cancel", None)):
        assert client.post(path, json=body).status_code == 401
        assert client.post(path, json=body, headers={"X-Imagegen-Token": "nope-nope-nope"}).status_code == 403
    r = upload(client, data)
    assert r.status_code == 200 and r.json()["images"] == 4
    assert client.get("/api/train").json() == {"state": "none"}             # reading needs no token
    assert client.get("/api/train/grid").status_code == 404


def test_no_token_is_refused_off_loopback(tmp_path):
    r = run_main("serve", str(tmp_path), "--no-token", "--host", "0.0.0.0")
    assert r.returncode == 2 and "loopback" in r.stderr
    r = run_main("serve", str(tmp_path), "--token", "short")
    assert r.returncode == 2 and "at least 8" in r.stderr


@pytest.mark.parametrize("members, links, message", [
    ({"../evil.png": png(1)}, (), "'..'"),
    ({"ok/../../evil.png": png(1)}, (), "'..'"),
    ({"/tmp/evil.png": png(1)}, (), "absolute"),
    ({"C:/evil.png": png(1)}, (), "absolute"),
    ({"a.png": png(1)}, ("link.png",), "symbolic link"),
    ({"bomb.png": b"\0" * (8 << 20)}, (), "zip bomb"),
    ({f"f{i}.png": b"x" for i in range(10_000)}, (), "at most"),                  # 10,000 tiny files
    ({"notes.md": b"hello"}, (), "no images"),
    ({"a.png": png(1), "a.png/b.png": png(2)}, (), "both a file and a folder"),
    ({"n" * 300 + ".png": png(1)}, (), "over 100 characters"),
    ({"d/" * 1500 + "a.png": png(1)}, (), "folders deep"),
])
def test_unsafe_or_unbounded_zips_are_refused_and_write_nothing(client, served, tmp_path, members, links, message):
    before = everything_under(tmp_path)
    r = upload(client, zip_bytes(members, links))
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    after = everything_under(tmp_path)
    assert not [p for p in after - before if not p.startswith("runs/studio") or "evil" in p or p.endswith(".png")]
    assert not (served / "studio" / "uploads").is_dir() or not any((served / "studio" / "uploads").iterdir())


def test_a_zip_that_is_not_one_or_too_big_is_refused(client, served, monkeypatch):
    assert upload(client, b"not a zip at all").status_code == 400
    # unpacked sizes: each member, then all together (as stored: the ratio check cannot see these)
    big = zip_bytes({"a.png": png(1, 64), "b.png": png(2, 64)})
    monkeypatch.setattr(jobs, "MAX_MEMBER_BYTES", 1000)
    r = upload(client, big)
    assert r.status_code == 400 and "at most 1000" in r.json()["detail"]
    monkeypatch.undo()
    sizes = [zipfile.ZipFile(io.BytesIO(big)).getinfo(n).file_size for n in ("a.png", "b.png")]
    monkeypatch.setattr(jobs, "MAX_TOTAL_BYTES", max(sizes) + 1)
    r = upload(client, big)
    assert r.status_code == 400 and "unpacks to over" in r.json()["detail"]
    assert not (served / "studio" / "uploads").is_dir() or not any((served / "studio" / "uploads").iterdir())
    monkeypatch.setattr("imagegen.serve.training.MAX_ZIP_BYTES", 1000)
    assert upload(client, tiny_folder_zip(8)).status_code == 413


def test_a_damaged_or_ambiguous_zip_is_a_4xx_not_a_crash(client, served):
    good = zip_bytes({"a.png": png(1), "b.png": png(2)})
    damaged = bytearray(good)
    at = damaged.index(b"a.png") + len("a.png") + 20                       # inside a.png's compressed bytes
    damaged[at] ^= 0xFF
    r = upload(client, bytes(damaged))
    assert r.status_code == 400 and "cannot unpack" in r.json()["detail"], r.text
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as z:
        z.writestr("a.png", png(1))
        z.writestr("A.PNG", png(2))
    r = upload(client, twice.getvalue())
    assert r.status_code == 400 and "same name" in r.json()["detail"], r.text
    assert not (served / "studio" / "uploads").is_dir() or not any((served / "studio" / "uploads").iterdir())


def test_only_images_and_captions_are_unpacked_inside_the_upload_folder(tmp_path):
    data = zip_bytes({"cats/a.png": png(1), "cats/a.txt": b"a cat", "run.sh": b"rm -rf /", ".hidden/b.png": png(2),
                      "metadata.jsonl": b'{"file_name": "cats/a.png", "text": "a cat"}\n'})
    (tmp_path / "z.zip").write_bytes(data)
    counts = jobs.unpack_upload(tmp_path / "z.zip", tmp_path / "out")
    assert counts == {"images": 1, "captions": 2, "skipped": 2}
    assert everything_under(tmp_path / "out") == {"cats", "cats/a.png", "cats/a.txt", "metadata.jsonl"}


def wait_for(client, state: str, timeout: float = 180.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        now = client.get("/api/train").json()
        if now["state"] == state:
            return now
        assert now["state"] == "running", now
        time.sleep(0.5)
    raise AssertionError(f"training did not reach {state!r} in {timeout} s: {now}")


def test_upload_train_and_serve_the_new_run_and_a_failure_or_cancel_leaves_a_working_server(client, served):
    headers = {"X-Imagegen-Token": TOKEN}
    up = upload(client, tiny_folder_zip()).json()
    assert up["images"] == 24
    # A family that needs classes on data that has them: trains, and the new run is served.
    r = client.post("/api/train", json={"upload": up["upload"], "family": "dcgan", "minutes": 0.1}, headers=headers)
    assert r.status_code == 200 and r.json()["state"] == "running"
    busy = client.post("/api/train", json={"upload": up["upload"], "family": "dcgan", "minutes": 0.1}, headers=headers)
    assert busy.status_code == 409                                           # one job at a time
    with client.stream("GET", "/api/train/events") as events:                # server-sent events until it stops
        states = [json.loads(line[len("data: "):])["state"] for line in events.iter_lines() if line.startswith("data: ")]
    assert states[-1] == "done" and set(states[:-1]) <= {"running"}
    done = wait_for(client, "done")
    assert done["step"] > 0 and done["model"] and done["grid_step"] == done["step"]   # the last grid: at the end
    grid = client.get("/api/train/grid")
    assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
    info = {m["name"]: m for m in client.get("/api/models").json()}[done["model"]]
    assert info["data"] == f"folder:{up['upload']}"                        # no absolute path in an open answer
    image = client.post("/api/generate", json={"model": done["model"], "seed": 3})
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # cgan needs labelled data: on the same upload with captions only... here a folder without classes
    flat = upload(client, zip_bytes({f"img{i}.png": png(i) for i in range(8)})).json()
    client.post("/api/train", json={"upload": flat["upload"], "family": "cgan", "minutes": 0.1}, headers=headers)
    failed = wait_for(client, "failed")
    assert "labelled" in failed["error"] or "class" in failed["error"], failed
    assert str(served) not in failed["error"]                             # the log's paths, relative
    assert failed["run"] != done["run"] and failed["step"] == 0            # not the earlier job's run
    # a long job, cancelled: the process goes, the server stays
    client.post("/api/train", json={"upload": up["upload"], "family": "dcgan", "minutes": 5}, headers=headers)
    time.sleep(1.0)
    cancelled = client.post("/api/train/cancel", headers=headers).json()
    assert cancelled["state"] == "cancelled" and cancelled["run"] != done["run"]
    assert client.get("/health").json()["status"] == "ok"
    bad = client.post("/api/train", json={"upload": "f" * 16, "family": "dcgan"}, headers=headers)
    assert bad.status_code == 404
    bad = client.post("/api/train", json={"upload": up["upload"], "family": "cyclegan"}, headers=headers)
    assert bad.status_code == 400 and "family" in bad.json()["detail"]


def test_a_latent_job_trains_an_autoencoder_then_the_model_on_its_latents(client, served):
    """`latent`: an autoencoder first (the status names the stage and shows its steps), then flow on its
    latents; the new run names that autoencoder, is served, and draws 64 px images. A family that learns
    no latents is refused, naming those that do."""
    headers = {"X-Imagegen-Token": TOKEN}
    up = upload(client, tiny_folder_zip()).json()
    assert client.get("/api/train/latent-families").json() == list(jobs.LATENT_FAMILIES)
    assert "flow" in jobs.LATENT_FAMILIES and "dcgan" not in jobs.LATENT_FAMILIES
    refused = client.post("/api/train", json={"upload": up["upload"], "family": "dcgan", "latent": True}, headers=headers)
    assert refused.status_code == 400 and "does not train on latents" in refused.json()["detail"]
    assert client.get("/api/train").json()["state"] == "none"
    r = client.post("/api/train", json={"upload": up["upload"], "family": "flow", "minutes": 0.4, "latent": True},
                    headers=headers)
    assert r.status_code == 200 and r.json()["stage"] == "autoencoder"
    seen, end = set(), time.time() + 180
    while (now := client.get("/api/train").json())["state"] == "running":
        seen.add((now["stage"], now["step"] > 0))
        assert time.time() < end, now
        time.sleep(0.2)
    assert now["state"] == "done" and now["stage"] == "model" and now["step"] > 0, now
    assert ("autoencoder", True) in seen, seen                       # its steps were shown while it trained
    model = json.loads((served / "studio" / "runs" / now["run"] / "config.json").read_text())["model"]
    autoencoder = Path(model["autoencoder"])
    assert autoencoder.parent.parent == served / "studio" / "autoencoders" and model["autoencoder_sha256"]
    assert json.loads((autoencoder / "config.json").read_text())["family"] == "ae"
    image = client.post("/api/generate", json={"model": now["model"], "seed": 3})
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)


def test_the_page_uploads_trains_and_explores_a_first_model_from_an_empty_folder(served, tmp_path):
    archive = tmp_path / "pets.zip"
    archive.write_bytes(tiny_folder_zip())
    with live_server(served, token=TOKEN) as port, chromium() as context:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")                                 # no token in the address
        page.wait_for_function("document.getElementById('error').textContent.includes('train one below')")
        assert page.is_visible("#train-panel") and page.is_hidden("#generate-panel")
        page.set_input_files("#train-zip", str(archive))
        page.click("#train-go")
        page.wait_for_function("document.getElementById('error').textContent.includes('401')")
        page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}")                   # as `imagegen serve` prints it
        assert page.url == f"http://127.0.0.1:{port}/"                         # the token left the address ...
        assert page.input_value("#token") == ""                                # ... and travels in the cookie
        page.set_input_files("#train-zip", str(archive))
        page.select_option("#train-family", "flow")
        assert page.is_enabled("#train-latent")                                # flow learns latents ...
        page.select_option("#train-family", "dcgan")
        assert page.is_disabled("#train-latent")                               # ... dcgan does not
        page.fill("#train-minutes", "0.2")                                     # a 12-second budget
        page.click("#train-go")
        page.wait_for_function("document.getElementById('train-status').textContent.startsWith('training dcgan')")
        page.wait_for_function("document.getElementById('train-status').textContent.startsWith('done')", timeout=180_000)
        page.wait_for_function("document.getElementById('train-grid').complete"
                               " && document.getElementById('train-grid').naturalWidth > 0")   # its sample grid
        page.wait_for_function("Array.from(document.querySelectorAll('.candidate'))"
                               ".filter(i => i.complete && i.dataset.command).length === 16")
        name = page.input_value("#model")
        assert name.startswith("studio/runs/") and page.is_visible("#generate-panel")
        commands = page.eval_on_selector_all(".candidate", "els => els.map(e => e.dataset.command)")
        assert all(str(served / name) in c for c in commands)
        # Train again on the same file, on latents: the page trains on the upload the server holds, not
        # sending it twice, and the job begins with its autoencoder.
        sent = []
        page.on("request", lambda r: sent.append(r.url))
        page.select_option("#train-family", "flow")
        page.check("#train-latent")
        page.fill("#train-minutes", "5")
        page.click("#train-go")
        page.wait_for_function("document.getElementById('train-status').textContent.startsWith('training the autoencoder')")
        assert any(u.endswith("/api/train") for u in sent) and not any(u.endswith("/api/upload") for u in sent)
        page.click("#train-cancel")
        page.wait_for_function("document.getElementById('train-status').textContent.startsWith('cancelled')")
    assert (served / name / "model.safetensors").is_file()


# --- the studio's disk and the job's limits ----------------------------------------------------------------

def test_the_same_zip_is_stored_once_and_only_the_newest_uploads_stay(client, served, monkeypatch):
    monkeypatch.setattr(jobs, "KEEP_UPLOADS", 2)
    data = tiny_folder_zip()                          # one file's bytes (a zip made again has new timestamps)
    first = upload(client, data).json()
    again = upload(client, data).json()
    assert again["upload"] == first["upload"] and again["reused"] and not first["reused"]
    assert again["images"] == first["images"] == 24
    ids = [upload(client, zip_bytes({f"a/{i}.png": png(i + 1000 * k) for i in range(4)})).json()["upload"] for k in range(2)]
    kept = {p.name for p in (served / "studio" / "uploads").iterdir()}
    assert kept == {ids[0], ids[1], f"{ids[0]}.json", f"{ids[1]}.json"}      # the oldest went, with its counts


def test_a_full_studio_refuses_uploads_and_stores_nothing(client, served, monkeypatch):
    upload(client, tiny_folder_zip())
    monkeypatch.setattr(jobs, "MAX_STUDIO_BYTES", 1000)
    r = upload(client, zip_bytes({"a/1.png": png(1)}))
    assert r.status_code == 507 and "over its cap" in r.json()["detail"]
    assert len(list((served / "studio" / "uploads").iterdir())) == 2         # the first upload and its counts only
    monkeypatch.setattr(jobs, "MAX_STUDIO_BYTES", 1 << 40)
    monkeypatch.setattr(jobs, "MIN_FREE_BYTES", 1 << 60)
    r = upload(client, zip_bytes({"a/1.png": png(1)}))
    assert r.status_code == 507 and "free on the disk" in r.json()["detail"]


def test_an_unpack_past_the_deadline_leaves_a_whole_upload_or_nothing(served, monkeypatch):
    from imagegen.serve import worker as W
    (served / "studio" / "uploads" / ".partial-0123456789abcdef-00").mkdir(parents=True)   # a crashed unpack
    check = jobs._safe_member

    def slow(info):                                   # 24 members x 25 ms, once the zip is open
        time.sleep(0.025)
        return check(info)
    monkeypatch.setattr(jobs, "_safe_member", slow)
    monkeypatch.setattr(W, "DEADLINE_S", 0.2)
    data = tiny_folder_zip()
    with TestClient(create_app(served, log=None, token=TOKEN), base_url=LOCAL) as c:
        assert not list((served / "studio" / "uploads").glob(".partial-*"))      # cleared at start-up
        assert upload(c, data).status_code == 503
        time.sleep(1.0)                                                          # the unpack finishes meanwhile
        names = {p.name for p in (served / "studio" / "uploads").iterdir()}
        assert len(names) == 2 and not any(n.startswith(".") for n in names)   # whole, under its content's id
        monkeypatch.setattr(W, "DEADLINE_S", 30.0)
        again = upload(c, data).json()
        assert again["reused"] and again["upload"] in names


def child_limits(pid: int) -> tuple[int, int]:
    """(nice, the address-space cap in bytes) of a process, from /proc."""
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max address space"))
    return nice, int(line.split()[3])


def test_a_job_runs_below_the_server_and_is_killed_past_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "GRACE_S", 0.5)
    job = jobs.launch([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "job.log", "u" * 16, "dcgan",
                      minutes=0.01, out=tmp_path)
    time.sleep(0.3)
    nice, cap = child_limits(job.process.pid)
    assert nice == os.nice(0) + jobs.JOB_NICE and cap == jobs.job_memory_bytes()
    job.process.wait(5)                                      # 0.6 s of budget, 0.5 s of grace
    status = job.status()
    assert status["state"] == "failed" and "killed" in status["error"]


def job_pids(marker: str, started: bool = False) -> list[int]:
    """The processes whose command line holds `marker` (the upload folder a job trains on); `started`:
    only those past their limits, now `imagegen train` itself (jobs.LIMITED has exec'd)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().decode(errors="replace") if proc.name.isdigit() else ""
        except OSError:
            continue
        if marker in line and (not started or line.split("\0")[1:4] == ["-m", "imagegen", "train"]):
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("how,latent", [("stopped", False), ("killed", False), ("killed", True)])
def test_the_training_process_ends_with_the_server(served, how, latent):
    """Also a latent job's: the death signal reaches its first process (serve/chain.py), which ends the
    autoencoder's training it started."""
    proc, port = serve_process(served, "--token", TOKEN)
    try:
        import httpx
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        headers = {"X-Imagegen-Token": TOKEN}
        up = httpx.post(base + "/api/upload", files={"archive": ("d.zip", tiny_folder_zip(), "application/zip")},
                        headers=headers, timeout=30).json()
        r = httpx.post(base + "/api/train", json={"upload": up["upload"], "family": "flow" if latent else "dcgan",
                                                  "minutes": 5, "latent": latent}, headers=headers, timeout=30)
        assert r.status_code == 200
        marker = str(served / "studio" / "uploads" / up["upload"])
        while not job_pids(marker, started=True):            # the job itself runs, its limits set
            assert time.time() < deadline, "the training process did not start"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM if how == "stopped" else signal.SIGKILL)
        proc.wait(15)
    t = time.time()
    while job_pids(marker):
        assert time.time() - t < 5, f"the training process outlived the server ({how})"
        time.sleep(0.1)


def test_stopping_the_app_ends_its_job_without_the_linux_death_signal(served, monkeypatch):
    """The app's own shutdown ends the job (for systems without PR_SET_PDEATHSIG, simulated by a launcher
    that does not set it): gone within 5 s of the app stopping."""
    monkeypatch.setattr(jobs, "LIMITED", jobs.LIMITED.replace("ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)", "pass"))
    with TestClient(create_app(served, log=None, token=TOKEN), base_url=LOCAL) as c:
        up = upload(c, tiny_folder_zip()).json()
        assert c.post("/api/train", json={"upload": up["upload"], "family": "dcgan", "minutes": 5},
                      headers={"X-Imagegen-Token": TOKEN}).status_code == 200
        marker = str(served / "studio" / "uploads" / up["upload"])
        t = time.time()
        while not job_pids(marker, started=True):
            assert time.time() - t < 30, "the training process did not start"
            time.sleep(0.1)
    t = time.time()
    while job_pids(marker):
        assert time.time() - t < 5, "the training process outlived the app"
        time.sleep(0.1)


def test_a_cancel_racing_the_jobs_end_is_no_error(tmp_path):
    job = jobs.launch([sys.executable, "-c", "pass"], tmp_path / "job.log", "u" * 16, "dcgan", minutes=1, out=tmp_path)
    job.process.wait(30)                       # the job has ended and been reaped ...
    job.process.poll = lambda: None            # ... but the cancel saw it running a moment before
    job.cancel()                               # its process group is gone: no ProcessLookupError
    assert job.cancelled
