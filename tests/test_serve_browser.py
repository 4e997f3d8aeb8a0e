"""`lipdub serve` web page in headless Chromium (Debian's chromium, driven by Playwright).

Drops ../shared/media p2 (a still photo) and the first 2 s of a1 on the page, submits with
the default detector, waits for the job to finish, and checks that the <video> element plays
and seeks the result, that the job list shows it, and that the console stayed clean. With
--token, the same page plays and downloads through signed links, and the token never appears
in a URL. Client file names (../../etc/passwd, HTML) are shown as text. /docs lists the API's
operations with every request kept on the server (offline).

No browser is downloaded: Playwright drives the system Chromium (`/usr/bin/chromium`, or
`$LIPDUB_CHROMIUM`); `.ci/run` installs it with `apt-get install chromium`.
"""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from .test_serve import A1, P2, P2_BOX, ServeProcess, trim_audio

CHROMIUM = os.environ.get("LIPDUB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
from playwright import sync_api  # noqa: E402  (the `test` extra: missing, the suite fails rather than skips)

# The browser is Debian's chromium (.ci/run installs it); missing, these tests fail rather than skip.
assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LIPDUB_CHROMIUM)"

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"]

DROP_FILE = """([selector, name, b64, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const zone = document.querySelector(selector);
  for (const kind of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(kind, { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, wav2lip_checkpoint):
    s = ServeProcess(tmp_path_factory.mktemp("serve-browser") / "data", wav2lip_checkpoint, "--workers", "1")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_upload_by_drag_and_drop_then_play_the_result(server, browser, media, tmp_path):
    audio = trim_audio(media / A1, tmp_path / "a1-2s.wav", 2.0)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    result_statuses: list[int] = []
    page.on("response", lambda r: result_statuses.append(r.status) if "/result" in r.url else None)
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#server-info:not(:empty)")
        assert page.locator("#jobs-empty").is_visible()

        for selector, path, ctype in (("#face-drop", media / P2, "image/png"), ("#audio-drop", audio, "audio/wav")):
            page.evaluate(DROP_FILE, [selector, path.name, base64.b64encode(path.read_bytes()).decode(), ctype])
        assert page.locator("#face-file").inner_text().startswith(P2)
        assert page.locator("#audio-file").inner_text().startswith("a1-2s.wav")
        page.select_option("#opt-blend", "feather")
        page.fill("#pad-bottom", "12")
        page.click("#submit")

        page.wait_for_selector("#job:not([hidden])")
        job_id = page.locator("#job-id").inner_text()
        assert len(job_id) == 22
        page.wait_for_function("() => ['done', 'failed', 'cancelled'].includes("
                               "document.getElementById('job-status').textContent)", timeout=120_000)
        status = page.locator("#job-status").inner_text().lower()
        assert status == "done", (page.locator("#job-error").inner_text(), server.log())
        assert page.locator("#job-percent").inner_text() == "100%"
        assert server.job(job_id)["options"]["pads"] == [0, 12, 0, 0]

        video = page.locator("#job-video")
        assert video.is_visible()
        page.wait_for_function("() => { const v = document.getElementById('job-video');"
                               " return v.readyState >= 2 && v.duration > 0; }", timeout=30_000)
        info = page.evaluate("""async () => {
            const v = document.getElementById('job-video');
            v.muted = true;
            await v.play();
            await new Promise((resolve) => {
              const tick = () => (v.currentTime > 0.5 ? resolve() : setTimeout(tick, 50));
              tick();
            });
            v.pause();
            const seeked = new Promise((resolve) => v.addEventListener('seeked', resolve, { once: true }));
            v.currentTime = 1.5;
            await seeked;
            return { width: v.videoWidth, height: v.videoHeight, duration: v.duration, time: v.currentTime,
                     error: v.error && v.error.code };
        }""")
        assert info["error"] is None and (info["width"], info["height"]) == (474, 474), info
        assert 1.8 <= info["duration"] <= 2.2 and abs(info["time"] - 1.5) < 0.1, info
        assert result_statuses and all(s in (200, 206) for s in result_statuses), result_statuses

        download = page.locator("#job-download")
        href = download.get_attribute("href")
        assert download.is_visible() and href.startswith(f"/api/jobs/{job_id}/result?expires=") and \
            href.endswith("&download=1"), href
        # The job list refreshes on its own timer: wait for it to catch up with the job.
        page.wait_for_selector(f"#jobs tr[data-id='{job_id}'][data-status='done']", timeout=15_000)
        row = page.locator(f"#jobs tr[data-id='{job_id}']")
        assert P2 in row.inner_text()
        page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
        assert not problems, problems
    finally:
        page.close()


def test_docs_page_lists_the_operations_offline(server, browser):
    """Swagger UI's scripts and styles come from the server (the fastapi-offline package): every
    request of the page goes to the server itself, and the page lists each API operation."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    origin = f"http://127.0.0.1:{server.port}/"
    outside: list[str] = []
    problems: list[str] = []

    def only_the_server(route) -> None:
        if route.request.url.startswith(origin):
            route.continue_()
        else:  # nothing else can be reached: no internet here, and none is needed
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        page.goto(origin + "docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        operations = page.evaluate("""() => [...document.querySelectorAll('.opblock')].map((o) =>
            o.querySelector('.opblock-summary-method').textContent + ' ' +
            o.querySelector('.opblock-summary-path').textContent)""")
        assert sorted(operations) == sorted([
            "GET /api/info", "POST /api/jobs", "GET /api/jobs", "GET /api/jobs/{job_id}", "DELETE /api/jobs/{job_id}",
            "GET /api/jobs/{job_id}/result", "POST /api/jobs/{job_id}/link", "POST /api/jobs/{job_id}/cancel"])
        assert page.locator(".info .title").inner_text().startswith("lipdub")
        assert page.locator("button.authorize").is_visible()  # the bearer scheme
        # an operation opens with its parameters: the upload form lists the run options
        page.click(".opblock-post:has(.opblock-summary-path[data-path='/api/jobs'])")
        page.wait_for_selector(".opblock.is-open .parameters-container, .opblock.is-open .opblock-section")
        body = page.locator(".opblock.is-open").inner_text()
        assert "face" in body and "audio" in body and "blend" in body, body[:500]
        assert not outside, outside
        assert not problems, problems
    finally:
        page.close()


def test_file_names_are_shown_as_text(server, browser, media):
    """A face named ../../etc/passwd and an audio file named like an HTML element: the page shows
    the names as text (no element made, no script run), and the job's files have the server's names."""
    audio_name = "<img src=x onerror=window.__pwned=1>.wav"  # (Chromium sends a double quote as %22)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#server-info:not(:empty)")
        for selector, name, path, ctype in (("#face-drop", "../../etc/passwd", media / P2, "image/png"),
                                            ("#audio-drop", audio_name, media / A1, "audio/wav")):
            page.evaluate(DROP_FILE, [selector, name, base64.b64encode(path.read_bytes()).decode(), ctype])
        assert page.locator("#audio-file").inner_text().startswith(audio_name)
        page.click("#submit")
        page.wait_for_selector("#job:not([hidden])")
        job_id = page.locator("#job-id").inner_text()
        job = server.job(job_id)
        assert job["face_name"] == "passwd" and job["audio_name"] == audio_name, job
        page.wait_for_function("() => document.getElementById('job-names').textContent !== ''")
        assert page.locator("#job-names").inner_text() == f"passwd + {audio_name}"
        page.wait_for_selector(f"#jobs tr[data-id='{job_id}']")
        row = page.locator(f"#jobs tr[data-id='{job_id}']")
        assert "passwd" in row.inner_text() and audio_name in row.inner_text()
        assert page.evaluate("document.querySelectorAll('main img').length") == 0
        assert page.evaluate("window.__pwned === undefined")
        stored = sorted(p.name for p in (server.data / "jobs" / job_id).iterdir())
        assert stored in (["audio.wav", "face.png"], ["audio.wav", "face.png", "result.mp4"]), stored
    finally:
        page.close()
        server.request("POST", f"/api/jobs/{job_id}/cancel")
        server.wait(job_id, timeout=60)


def test_page_reports_a_refused_upload(server, browser, media):
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#server-info:not(:empty)")
        page.click("#submit")
        assert page.locator("#form-error").inner_text() == "Choose a face video or image first."
        page.set_input_files("#face-input", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                     "buffer": b"not a video\n" * 10}])
        page.set_input_files("#audio-input", str(media / A1))
        page.click("#submit")
        page.wait_for_function("() => document.getElementById('form-error').textContent !== ''")
        assert page.locator("#form-error").inner_text() == \
            "face: 'notes.txt' is not a video or an image lipdub can read (unrecognised content)"
    finally:
        page.close()


def test_page_asks_for_the_token_then_plays_through_signed_links(tmp_path, wav2lip_checkpoint, browser, media):
    """With --token: the page asks for it, sends it only in Authorization headers, and plays and
    downloads the result through signed links (no token in any URL the browser requests)."""
    token = "browser-" + os.urandom(8).hex()
    server = ServeProcess(tmp_path / "data", wav2lip_checkpoint, token=token).start()
    page = browser.new_page()
    problems: list[str] = []
    urls: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: urls.append(r.url))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#token-bar:not([hidden])")
        assert not problems, problems  # asked for the token without a failing request
        page.fill("#token-input", "wrong")
        page.click("#token-form button")
        page.wait_for_function("() => document.getElementById('token-error').textContent !== ''")
        page.fill("#token-input", token)
        page.click("#token-form button")
        page.wait_for_selector("#token-bar[hidden]", state="attached")
        page.wait_for_selector("#server-info:not(:empty)")
        page.wait_for_selector("#jobs-empty:not([hidden])")
        assert page.evaluate("localStorage.getItem('lipdub-token')") == token
        problems.clear()  # the wrong token's 401 was expected; from here on nothing may fail

        job_id = server.submit_ok(media / P2, trim_audio(media / A1, tmp_path / "a1-1s.wav", 1.0), box=P2_BOX)
        page.evaluate(f"selectJob('{job_id}')")
        page.wait_for_function("() => document.getElementById('job-status').textContent === 'done'",
                               timeout=120_000)
        page.wait_for_function("() => { const v = document.getElementById('job-video');"
                               " return v.readyState >= 2 && v.duration > 0; }", timeout=30_000)
        video_src = page.locator("#job-video").get_attribute("src")
        href = page.locator("#job-download").get_attribute("href")
        for url in (video_src, href):
            assert url.startswith(f"/api/jobs/{job_id}/result?expires=") and "&sig=" in url, url
        assert href.endswith("&download=1")
        # the signed link works without any header; the plain result URL does not
        assert server.request("GET", href, token=None).headers["content-disposition"].startswith("attachment")
        assert server.request("GET", f"/api/jobs/{job_id}/result", token=None).status == 401
        assert urls and not [u for u in urls if token in u or "token=" in u], urls
        assert not problems, problems

        # a link that ran out while the page was open: the video asks for a new one by itself ...
        page.evaluate(f"document.getElementById('job-video').src = '/api/jobs/{job_id}/result?expires=1&sig=x'")
        page.wait_for_function("() => { const v = document.getElementById('job-video');"
                               " return v.src.includes('&sig=') && !v.src.includes('sig=x') && v.readyState >= 2; }",
                               timeout=30_000)
        # ... and so does the download link when its link is stale
        links_asked = sum(u.endswith("/link") for u in urls)
        page.evaluate("state.link.expires_at = 0")
        with page.expect_download(timeout=30_000) as download:
            page.click("#job-download")
        assert download.value.suggested_filename == "p2_woman_frontal_closed_mouth_474-lipdub.mp4"
        assert sum(u.endswith("/link") for u in urls) == links_asked + 1
    finally:
        page.close()
        server.stop()
