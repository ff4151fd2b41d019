"""Requests per second and peak memory of ``skipvision serve`` under concurrent requests: a vanilla checkpoint
against its Skip-Vision conversion, one server process each, on this machine's CPU (or --device).

    .venv/bin/python scripts/serve_bench.py                      # tiny preset, made in a temporary folder
    .venv/bin/python scripts/serve_bench.py --vanilla DIR --skip DIR --device cuda

Both servers run side by side and take the rounds in turn (one busy at a time), so machine drift hits both alike.
Each round sends --concurrency chat requests at once (an image and a question, greedy, --max-tokens), with
``stream=False``, through the ``openai`` client. Peak memory is the server process's peak resident set size
(VmHWM) over the rounds only: it is reset after the warm-up through /proc/PID/clear_refs, so loading the model is
not counted; "after load" is its resident size before the rounds. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# A vanilla checkpoint turned into a Skip-Vision one and saved, through the public API only.
CONVERT = """
import sys
import skipvision
from skipvision import SkipVisionConfig

cfg = SkipVisionConfig(num_retained=int(sys.argv[3]), num_skipped=int(sys.argv[4]))
skipvision.from_pretrained(sys.argv[1], skip_vision=cfg).save_pretrained(sys.argv[2])
skipvision.save_processor(skipvision.load_processor(sys.argv[1], cfg), sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Server:
    def __init__(self, name: str, model: Path, device: str, log: Path):
        import openai

        self.name, self.model, self.port = name, str(model), _free_port()
        self.log = log.open("w")
        command = [sys.executable, "-m", "skipvision", "serve", self.model, "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--device", device], stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)
        self.log_path = log

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} server not ready after {timeout} s")

    def chat(self, image_url: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
        start = time.perf_counter()
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            max_tokens=max_tokens,
            temperature=0,
        )
        return time.perf_counter() - start, reply.usage.prompt_tokens, reply.usage.completion_tokens

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=120)
        self.log.close()
        return code


def _images(n: int) -> list[str]:
    from PIL import Image

    urls = []
    for i in range(n):
        image = Image.new("RGB", (168 + 16 * i, 168), (255, 255, 255))
        image.paste(((37 * i) % 256, (91 * i) % 256, (53 * i) % 256), (40, 40, 120, 120))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def _make_checkpoints(root: Path, preset: str, retained: int, skipped: int) -> tuple[Path, Path]:
    vanilla, skip = root / "vanilla", root / "skip"
    run = [sys.executable, "-m", "skipvision"]
    subprocess.run([*run, "init-model", "--preset", preset, "--out", str(vanilla)], check=True, capture_output=True)
    command = [sys.executable, "-c", CONVERT, str(vanilla), str(skip), str(retained), str(skipped)]
    subprocess.run(command, check=True, capture_output=True)
    return vanilla, skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vanilla", type=Path, help="vanilla checkpoint (default: --preset's, made here)")
    parser.add_argument(
        "--preset", default="tiny", help="`skipvision init-model` preset of the default (default: tiny)"
    )
    parser.add_argument("--skip", type=Path, help="Skip-Vision checkpoint (default: --vanilla converted, N_r=N_s=36)")
    parser.add_argument("--num-retained", type=int, default=36, help="N_r of the conversion (default: 36)")
    parser.add_argument("--num-skipped", type=int, default=36, help="N_s of the conversion (default: 36)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests sent at once (default: 8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server (default: 5)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    parser.add_argument("--device", default="cpu", help="server --device (default: cpu)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vanilla, skip = args.vanilla, args.skip
        if vanilla is None:
            vanilla, made = _make_checkpoints(root, args.preset, args.num_retained, args.num_skipped)
            skip = skip or made
        elif skip is None:
            skip = root / "skip"
            command = [sys.executable, "-c", CONVERT, str(vanilla), str(skip)]
            subprocess.run([*command, str(args.num_retained), str(args.num_skipped)], check=True, capture_output=True)
        servers = [
            Server("vanilla", vanilla, args.device, root / "vanilla.log"),
            Server("Skip-Vision", skip, args.device, root / "skip.log"),
        ]
        try:
            for server in servers:
                server.wait_ready()
            images = _images(args.concurrency)
            prompts = [f"What color is the square? ({i})" for i in range(args.concurrency)]
            after_load, prompt_tokens = {}, {}
            for server in servers:
                _, prompt_tokens[server.name], _ = server.chat(images[0], prompts[0], args.max_tokens)  # warm-up
                after_load[server.name] = _status_kib(server.process.pid, "VmRSS")
                # reset the peak so that it covers the rounds, not the model load
                Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
            rounds: dict[str, list[tuple[float, list[tuple[float, int, int]]]]] = {s.name: [] for s in servers}
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                for _ in range(args.rounds):
                    for server in servers:
                        start = time.perf_counter()
                        results = list(
                            pool.map(
                                lambda i, s=server: s.chat(images[i], prompts[i], args.max_tokens),
                                range(args.concurrency),
                            )  # fmt: skip
                        )
                        rounds[server.name].append((time.perf_counter() - start, results))
            peaks = {s.name: _status_kib(s.process.pid, "VmHWM") for s in servers}
        finally:
            codes = {s.name: s.stop() for s in servers}

    print(
        f"{args.concurrency} concurrent requests per round (image + question, greedy, max_tokens={args.max_tokens}), "
        f"{args.rounds} rounds per server, device {args.device}; req/s and tokens/s over all rounds; "
        f"exit codes after SIGTERM: {json.dumps(codes)}\n"
    )
    print(
        "| checkpoint | prompt tokens | req/s | new tokens/s | latency median / max (s) "
        "| peak RSS while serving (MiB) | RSS after load (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for server in servers:
        wall = sum(wall for wall, _ in rounds[server.name])
        results = [r for _, round_results in rounds[server.name] for r in round_results]
        latencies = [latency for latency, _, _ in results]
        new_tokens = sum(tokens for _, _, tokens in results)
        print(
            f"| {server.name} | {prompt_tokens[server.name]} | {len(results) / wall:.2f} "
            f"| {new_tokens / wall:.1f} | {statistics.median(latencies):.2f} / {max(latencies):.2f} "
            f"| {peaks[server.name] / 1024:.0f} | {after_load[server.name] / 1024:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
