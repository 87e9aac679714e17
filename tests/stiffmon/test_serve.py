"""``stiffmon serve``: the monitor in a real (headless Chromium) browser tab."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from stiffmon.serve import ServeError, app_command, exposure_warning, is_loopback

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = sorted((ROOT / "demos" / "sessions").glob("*.stiff"))
NAMES = ("sgd lr=0.01", "sgd lr=0.05", "sgd lr=0.2")  # the runs in demos/sessions
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1280,800",
)
# Keep every text frame the page's websockets receive (the terminal itself draws on a canvas).
CAPTURE_JS = """
(() => {
  const Orig = window.WebSocket;
  window.__received = [];
  const keep = (d) => {
    if (typeof d === 'string') window.__received.push(d);
    else if (d instanceof Blob) d.arrayBuffer().then((b) => keep(b));
    else window.__received.push(new TextDecoder().decode(d));
  };
  function Capturing(url, protocols) {
    const ws = protocols === undefined ? new Orig(url) : new Orig(url, protocols);
    ws.addEventListener('message', (ev) => keep(ev.data));
    return ws;
  }
  Capturing.prototype = Orig.prototype;
  Object.assign(Capturing, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
  window.WebSocket = Capturing;
})();
"""


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and exposure_warning(host, 8000) is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        assert not is_loopback(host)
        assert "which is not loopback" in (exposure_warning(host, 8000) or "")


def test_app_command_replays_the_sessions_of_a_directory(tmp_path: Path) -> None:
    for name in ("b.stiff", "a.stiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cmd = app_command([str(tmp_path)])
    assert f"replay {tmp_path / 'a.stiff'} {tmp_path / 'b.stiff'} --speed" in cmd
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match=r"no \.stiff session files"):
        app_command([str(tmp_path / "empty")])


def test_app_command(tmp_path: Path) -> None:
    f = tmp_path / "a b.stiff"
    f.write_bytes(b"")
    cmd = app_command([str(f)], speed=0)
    assert " replay " in cmd and "'" + str(f.resolve()) + "'" in cmd and "--speed 0" in cmd
    assert app_command(["tcp://127.0.0.1:5555"], ascii=True).endswith(
        "watch tcp://127.0.0.1:5555 --ascii"
    )
    assert app_command([]).endswith(" -m stiffmon watch")
    with pytest.raises(ServeError, match="not both"):
        app_command([str(f), "tcp://127.0.0.1:5555"])
    with pytest.raises(ServeError, match=r"no such session file: missing\.stiff"):
        app_command(["missing.stiff"])


def test_non_loopback_address_warns(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    from stiffmon.cli import main

    def refuse(self: object, debug: bool = False) -> None:
        raise KeyboardInterrupt  # do not actually listen

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        from textual_serve import server

        m.setattr(server.Server, "serve", refuse)
        port = _free_port()
        assert main(["serve", "--host", "0.0.0.0", "--port", str(port)]) == 130
    assert f"serve binds http://0.0.0.0:{port}, which is not loopback" in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    from stiffmon.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"stiffmon serve: port {port} is already in use on 127.0.0.1: pick another with --port, "
        "or --port 0 for any free one\n"
    )


def test_a_port_taken_after_the_probe_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    import errno

    from textual_serve import server

    from stiffmon.cli import main

    def taken(self: object, debug: bool = False) -> None:
        raise OSError(errno.EADDRINUSE, "error while attempting to bind: address already in use")

    monkeypatch.setattr(server.Server, "serve", taken)
    port = _free_port()
    assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} is already in use" in err


def test_port_0_serves_on_a_free_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    from textual_serve import server

    from stiffmon.cli import main

    seen: list[tuple[int, str]] = []

    def record(self: server.Server, debug: bool = False) -> None:
        seen.append((self.port, self.public_url))
        raise KeyboardInterrupt  # do not actually listen

    monkeypatch.setattr(server.Server, "serve", record)
    assert main(["serve", "--port", "0"]) == 130
    [(port, url)] = seen
    assert 0 < port < 65536 and url == f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--host", "no-such-host.invalid"], "cannot listen on --host no-such-host.invalid: "),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1: not an address of this machine"),
    ],
)
def test_a_host_it_cannot_listen_on_is_a_one_line_error(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    from stiffmon.cli import main

    assert main(["serve", *argv, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stiffmon serve: {says}") and err.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "stiffmon serve exited early"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    f = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "chromium exited early"
        if f.exists() and f.read_text().strip():
            return int(f.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


async def _browse(devtools: int, url: str, shot: Path, timeout: float) -> str:
    """Open ``url`` in the page target over the DevTools protocol; screenshot once the run names
    have reached the page; return what the page's websockets received."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools}/json/list") as r:
            pages = [t for t in await r.json(content_type=None) if t["type"] == "page"]
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 10**6))

            async def call(method: str, **params: object) -> dict[str, object]:
                i = next(ids)
                await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg["result"]  # type: ignore[no-any-return]

            await call("Page.enable")
            await call("Page.addScriptToEvaluateOnNewDocument", source=CAPTURE_JS)
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            text = ""
            while time.monotonic() < deadline:
                res = await call(
                    "Runtime.evaluate",
                    expression="(window.__received || []).join('')",
                    returnByValue=True,
                )
                text = str(res["result"]["value"])  # type: ignore[index]
                if all(n in text for n in NAMES):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)  # let the terminal draw what arrived
            res = await call("Page.captureScreenshot", format="png")
            shot.write_bytes(base64.b64decode(str(res["data"])))
            return text


@pytest.mark.slow
def test_browser_shows_the_overview_with_the_run_names(tmp_path: Path) -> None:
    pytest.importorskip(
        "textual_serve", reason="needs textual-serve: pip install 'stiffmon[serve]'"
    )
    image = pytest.importorskip("PIL.Image")
    chromium = next(
        (
            shutil.which(c)
            for c in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(c)
        ),
        None,
    )
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run installs it where it can)")
    assert len(SESSIONS) == 3
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    serve = subprocess.Popen(
        [sys.executable, "-m", "stiffmon", "serve", *map(str, SESSIONS), "--port", str(port),
         "--speed", "0"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    profile = Path(tempfile.mkdtemp(prefix="stiffmon-chromium-", dir=tmp_path))
    browser: subprocess.Popen[bytes] | None = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, serve, timeout=30)
        browser = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        devtools = _devtools_port(profile, browser, timeout=30)
        shot = tmp_path / "serve.png"
        text = asyncio.run(_browse(devtools, url, shot, timeout=60))
        for name in NAMES:
            served = (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            assert name in text, f"{name!r} never reached the browser; serve said:\n{served}"
        assert "Overview" in text or "overview" in text
        img = image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
        assert img.width == 1280 and img.height > 400
        colours = img.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, "the screenshot is (nearly) blank"
        if os.environ.get("STIFFMON_SCREENSHOT"):  # refresh the README's picture
            shutil.copy(shot, os.environ["STIFFMON_SCREENSHOT"])
    finally:
        for proc in (browser, serve):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        log.close()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    from stiffmon.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: stiffmon serve" in out and "--host HOST" in out


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from stiffmon.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", port])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: stiffmon serve" in err and "Traceback" not in err
    assert "stiffmon serve: error: argument --port: must be an integer >= 0 and <= 65535" in err


def test_the_monitor_runs_without_a_tty_under_another_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """textual-serve runs the app on pipes with TEXTUAL_DRIVER set to its web driver."""
    import argparse

    from stiffmon import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a tty
    args = argparse.Namespace(command="replay")
    monkeypatch.delenv("TEXTUAL_DRIVER", raising=False)
    assert cli._no_terminal(args) == 2
    monkeypatch.setenv("TEXTUAL_DRIVER", "textual.drivers.web_driver:WebDriver")
    assert cli._no_terminal(args) is None
