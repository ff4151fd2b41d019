"""``skipvision serve``: transformers' OpenAI-compatible server on a tiny Skip-Vision checkpoint, in a subprocess,
talked to with the ``openai`` client: greedy answers equal ``skipvision generate``, concurrent requests equal
sequential ones, bad requests get 4xx while the server keeps serving, a checkpoint whose processor disagrees with
its settings is refused in one line, and SIGTERM shuts it down with exit code 0."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from PIL import Image  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "What color is the shape?"
MAX_TOKENS = 8
# A vanilla tiny LLaVA turned into a Skip-Vision one and saved, through the public API only.
CONVERT = """
import sys
import skipvision
from skipvision import SkipVisionConfig

cfg = SkipVisionConfig(num_retained=36, num_skipped=36)
skipvision.from_pretrained(sys.argv[1], skip_vision=cfg).save_pretrained(sys.argv[2])
skipvision.save_processor(skipvision.load_processor(sys.argv[1], cfg), sys.argv[2])
"""


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(color, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    image.save(path)
    return path


def _data_url(image: Image.Image | Path) -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
    else:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _user(text: str, image_url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _same_text(streamed: str, full: str) -> bool:
    """HF's streamer decodes token by token and holds back an unfinished UTF-8 sequence, which a random model's
    byte tokens can leave at the end (the full decode shows it as U+FFFD): otherwise the texts are equal."""
    return full.startswith(streamed) and set(full[len(streamed) :]) <= {"\ufffd"}


class Server:
    def __init__(self, model: Path, log: Path):
        self.model, self.log_path, self.port = str(model), log, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        command = [sys.executable, "-m", "skipvision", "serve", self.model, "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--device", "cpu"], stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def chat(self, messages: list[dict], stream: bool = False, **options) -> str:
        options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
        if not stream:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, **options)
            return reply.choices[0].message.content
        chunks = self.client.chat.completions.create(model=self.model, messages=messages, stream=True, **options)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    vanilla, skip = root / "vanilla", root / "skip"
    _run("-m", "skipvision", "init-model", "--preset", "tiny", "--out", str(vanilla))
    _run("-c", CONVERT, str(vanilla), str(skip))
    images = [
        _image(root / f"shape-{i}.png", size, color)
        for i, (size, color) in enumerate(
            [
                ((168, 168), (220, 30, 30)),
                ((200, 120), (30, 200, 30)),
                ((90, 140), (30, 30, 220)),
                ((64, 64), (0, 0, 0)),
            ]
        )
    ]
    return root, vanilla, skip, images


@pytest.fixture(scope="module")
def server(checkpoints):
    root, _vanilla, skip, _images = checkpoints
    server = Server(skip, root / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_greedy_answers_equal_skipvision_generate(server, checkpoints):
    _root, _vanilla, skip, images = checkpoints
    out = _run("-m", "skipvision", "generate", "--model", str(skip), "--image", str(images[0]), "--prompt", PROMPT,
               "--max-new-tokens", str(MAX_TOKENS))  # fmt: skip
    expected = out.stdout.split(f"{PROMPT!r} -> ", 1)[1].rsplit("\nprompt ", 1)[0]
    assert expected.strip()
    assert server.chat([_user(PROMPT, _data_url(images[0]))]).strip() == expected
    assert _same_text(server.chat([_user(PROMPT, images[0].resolve().as_uri())], stream=True).strip(), expected)

    # text only, and a second turn on the first turn's answer: streaming and not give the same text
    text_only = [{"role": "user", "content": "Say something."}]
    full = server.chat(text_only)
    assert full and _same_text(server.chat(text_only, stream=True), full)
    turns = [_user(PROMPT, _data_url(images[0])), {"role": "assistant", "content": expected}, _user("And its size?")]
    answer = server.chat(turns)
    assert answer and _same_text(server.chat(turns, stream=True), answer)
    assert answer != server.chat(turns[:1] + [_user("And its size?")])  # the answer turn is in the prompt


def test_concurrent_requests_equal_sequential_answers(server, checkpoints):
    _root, _vanilla, _skip, images = checkpoints
    requests = [
        ([_user(f"{PROMPT} ({i})", _data_url(images[i % len(images)]))] if i % 4 else [_user(f"Count to {i}.")], i % 2)
        for i in range(8)
    ]
    sequential = [server.chat(messages, stream=bool(stream)) for messages, stream in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda r: server.chat(r[0], stream=bool(r[1])), requests))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the prompts differ, and so do the answers


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, checkpoints):
    _root, _vanilla, _skip, images = checkpoints
    good = [_user(PROMPT, _data_url(images[1]))]
    before = server.chat(good)
    broken = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    cases = {
        "broken image": ([_user(PROMPT, broken)], {}, "could not be read as an image"),
        "1x1 image": ([_user(PROMPT, _data_url(Image.new("RGB", (1, 1))))], {}, "1x1 pixels"),
        "unknown model": (good, {"model": "no-such-model"}, "no-such-model"),
        "empty message list": ([], {}, "non-empty list"),
        "huge max_tokens": (good, {"max_tokens": 10**9}, "context"),
        "too many images for the context": ([_user(PROMPT, _data_url(images[3]))] * 60, {}, "context"),
        "image placeholder typed in the text": ([_user("look: <image>")], {}, "<image>"),
        "negative temperature": (good, {"temperature": -1}, "temperature"),
    }
    for name, (messages, options, says) in cases.items():
        for stream in (False, True):
            kwargs = {
                "model": server.model,
                "messages": messages,
                "max_tokens": MAX_TOKENS,
                "stream": stream,
                **options,
            }
            with pytest.raises(openai.APIStatusError) as raised:
                server.client.chat.completions.create(**kwargs)
            error = raised.value
            assert 400 <= error.status_code < 500, (name, error.status_code, error.body)
            assert says in error.body["message"], (name, error.body)
    for body, says in ((b'{"model": "x", "messages": [', "not valid JSON"), (b"[1, 2]", "JSON object")):
        status, reply = server.request("POST", "/v1/chat/completions", body)
        assert status == 400 and says in reply["error"]["message"], reply
    assert server.process.poll() is None
    assert server.chat(good) == before


def test_refuses_a_checkpoint_whose_processor_disagrees(checkpoints):
    root, vanilla, skip, _images = checkpoints
    mismatched = root / "mismatched"
    mismatched.mkdir()
    for path in skip.iterdir():
        os.symlink(path, mismatched / path.name)
    (mismatched / "processor_config.json").unlink()  # the vanilla model's processor next to Skip-Vision weights
    os.symlink(vanilla / "processor_config.json", mismatched / "processor_config.json")
    command = [sys.executable, "-m", "skipvision", "serve", str(mismatched), "--port", str(_free_port())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("skipvision serve: error:")]
    assert len(errors) == 1 and "writes 144 image placeholder tokens" in errors[0] and "needs 74" in errors[0]


def test_sigterm_shuts_down_cleanly(server):
    # last in this file: it stops the module's server
    assert server.chat([{"role": "user", "content": "Hello"}])
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 60
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
