"""P8, P9 and P10: `idefics serve`'s prefix cache, batching and the CLI as its client, against same-run baselines.

    python bench/serve.py [--reps N] [--max-new-tokens 64] [--smoke] [--model DIR]

One server (a child process: the random mid-size Idefics2, 4-bit nf4 on the CPU, --max-batch 8) answers
streamed chat completions over pages of a generated invoice PDF, sent as `file` parts with a page selection.
- P8: a first question over a page, then a second question over the same page (its image prefix now cached):
  time to first token (request sent -> first piece of the answer) of the second <= 0.15x the first's.
  Every round uses a page the server has not seen.
- P9: 8 one-page requests (8 pages not seen before) sent at once, against 8 others sent one after another:
  total wall of the concurrent 8 <= 0.5x the sequential 8. Rounds alternate which side goes first.
- P10: `idefics ask --server URL PAGE Q` (the CLI as a client: no torch, a page the server has not seen) against a
  cold `idefics ask PAGE Q` (loads the model): wall from spawn to exit of each, <= 0.25x. Both answer the same
  page; their answers are compared. Rounds alternate which side goes first.
P10 also prints its floor from the same run: the server's own time for the `--server` requests (its access log)
against the cold ask, which no client can go below.
Figures are medians over --reps rounds. P8 and P9 time the driver's HTTP requests, P10 child processes; the
server stays loaded.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common as c

FOLLOW_UP = "What is the invoice number on this page?"
ACCESS = re.compile(r"POST /v1/chat/completions 200 tokens=\d+ ([\d.]+)s")


class Server:
    def __init__(self, model: str, max_new_tokens: int, smoke: bool, device: str = "cpu"):
        cmd = [*c.idefics_cmd(), "serve", "--model", model, "--quant", "4bit", "--device", device, "--port", "0",
               "--max-batch", "8", "--max-queue", "64", "--max-new-tokens", str(max_new_tokens)]
        if smoke:
            cmd += ["--quant", "none", "--no-split"]  # the smoke only checks that the code runs: 1 crop a page
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=c.env(), cwd=c.ROOT)
        c.own(self.proc.pid)  # the server works while the runs are timed: its CPU is this benchmark's, not foreign
        self.url = None
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(600)
        import httpx

        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if self.proc.poll() is not None or self.url is None:
                raise SystemExit("the server did not start:\n" + "\n".join(self.lines[-20:]))
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server never became ready")

    def request_seconds(self, seen: int, timeout: float = 5.0) -> float | None:
        """The server's own seconds (its access log) for the first chat completion logged after `seen` lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                m = ACCESS.search(line)
                if m:
                    return float(m.group(1))
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        c.OWN_PIDS.discard(self.proc.pid)


def ask(url: str, pdf_b64: str, page: int, question: str) -> tuple[float, float, str]:
    """One streamed request: (time to first piece, total wall, answer)."""
    import json

    import httpx

    body = {"stream": True, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf_b64}", "pages": str(page)}},
        {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    first, pieces = None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"error: {chunk['error']}")
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first if first is not None else time.perf_counter() - start
                pieces.append(content)
    wall = time.perf_counter() - start
    return (first if first is not None else wall), wall, "".join(pieces)


def p10(server: Server, model: str, pdf: str, pages: list[int], n: int, smoke: bool) -> tuple[list, list, list, list]:
    """P10: `idefics ask --server` (a page the server has not seen) against a cold `idefics ask` of the same page
    (model loading included), each a child process timed from spawn to exit; rounds alternate which goes first.
    Also the server's own seconds for each `--server` request (its access log): the part no client can save."""
    local_flags = ["--model", model, "--quant", "4bit", "--device", "cpu", "--max-new-tokens", str(n)]
    local_flags += ["--quant", "none", "--no-split"] if smoke else []  # as the server (Server)
    rounds = iter(pages)
    cold, warm, same, served = [], [], [], []

    def one_round():
        page = next(rounds)
        args = ["ask", pdf, "--pages", str(page), c.QUESTION, "--json"]
        answers = {}

        def run_cold():
            r = c.run([*c.idefics_cmd(), *args, *local_flags])
            cold.append(r.wall)
            answers["cold"] = json.loads(r.stdout)["answer"]

        def run_server():
            seen = len(server.lines)
            r = c.run([*c.idefics_cmd(), *args, "--server", server.url, "--max-new-tokens", str(n)])
            warm.append(r.wall)
            served.append(server.request_seconds(seen))
            answers["server"] = json.loads(r.stdout)["answer"]

        first, second = (run_cold, run_server) if len(cold) % 2 == 0 else (run_server, run_cold)
        first()
        second()
        same.append(answers["cold"] == answers["server"])
        print(f"  P10 round {len(cold)}: cold {cold[-1]:.2f} s, --server {warm[-1]:.2f} s", file=sys.stderr)

    for _ in pages:
        one_round()
    return cold, warm, same, served


def p8_p9(server: Server, data: str, fresh, reps: int) -> dict:
    """P8 and P9 on a started server over the base64 PDF `data`, each round on pages from `fresh` not seen before:
    {"first", "second"} (time to first token), {"sequential", "concurrent"} (wall of 8 requests) and "shared" (the
    concurrent 8's wall after the last of them got its first token: the decode they share), per round."""
    first, second = [], []
    for k in range(reps):
        page = next(fresh)
        first.append(ask(server.url, data, page, c.QUESTION)[0])
        second.append(ask(server.url, data, page, FOLLOW_UP)[0])
        print(f"  P8 round {k + 1}/{reps}: {first[-1]:.2f} s then {second[-1]:.2f} s", file=sys.stderr)
    sequential, concurrent, shared = [], [], []

    def run_sequential():
        pages = [next(fresh) for _ in range(8)]
        start = time.perf_counter()
        for page in pages:
            ask(server.url, data, page, c.QUESTION)
        sequential.append(time.perf_counter() - start)

    def run_concurrent():
        pages = [next(fresh) for _ in range(8)]
        start = time.perf_counter()

        def one(page):
            sent = time.perf_counter() - start
            first_token, wall, _ = ask(server.url, data, page, c.QUESTION)
            return sent + first_token, sent + wall

        with ThreadPoolExecutor(8) as pool:
            times = list(pool.map(one, pages))
        concurrent.append(time.perf_counter() - start)
        shared.append(max(end for _, end in times) - max(joined for joined, _ in times))

    c.interleave({"sequential": run_sequential, "concurrent": run_concurrent}, reps)
    return {"first": first, "second": second, "sequential": sequential, "concurrent": concurrent, "shared": shared}


def p8_p9_tables(r: dict, reps: int, n: int, where: str = "") -> None:
    p8 = c.median(r["second"]) / c.median(r["first"])
    p9 = c.median(r["concurrent"]) / c.median(r["sequential"])
    c.table(f"P8 second question over the same page{where}, time to first token, median of {reps}", [
        ["first question (page not cached; baseline)", f"{c.median(r['first']):.2f} s", "1.00x", ""],
        ["second question (image prefix cached)", f"{c.median(r['second']):.2f} s", f"{p8:.3f}x",
         c.verdict(p8, 0.15, True)],
    ], ["request", "first token", "ratio", "target"])
    c.table(f"P9 8 one-page requests{where}, {n} new tokens, total wall, median of {reps}", [
        ["one after another (baseline)", f"{c.median(r['sequential']):.2f} s", "1.00x", ""],
        ["8 at once (batched)", f"{c.median(r['concurrent']):.2f} s", f"{p9:.3f}x", c.verdict(p9, 0.5, True)],
    ], ["requests", "wall", "ratio", "target"])
    if r.get("shared"):
        admitted = c.median(r["concurrent"]) - c.median(r["shared"])
        print(f"P9, 8 at once: {admitted:.2f} s until the last of them had its first token (each request's pages "
              f"through the vision tower and prefill, one request at a time), then {c.median(r['shared']):.2f} s of "
              "decoding shared by the rows", flush=True)


def main(argv=None) -> int:
    p = c.parser(__doc__, reps=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    reps = 1 if args.smoke else args.reps
    n = 8 if args.smoke else args.max_new_tokens
    c.header("P8/P9/P10 idefics serve", args)
    model = args.model or c.model_dir("tiny" if args.smoke else "mid")
    pages_needed = reps + reps * 16 + reps
    with tempfile.TemporaryDirectory() as tmp:
        pdf = c.make_pdf(os.path.join(tmp, "invoices.pdf"), pages_needed)
        with open(pdf, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        server = Server(model, n, args.smoke)
        try:
            fresh = iter(range(1, pages_needed + 1))
            rounds = p8_p9(server, data, fresh, reps)
            cold, warm, same, served = p10(server, model, pdf, [next(fresh) for _ in range(reps)], n, args.smoke)
        finally:
            server.close()
    p8_p9_tables(rounds, reps, n)
    p10_ratio = c.median(warm) / c.median(cold)
    c.table(f"P10 idefics ask over one page, wall from spawn to exit, median of {reps}", [
        ["cold idefics ask (loads the model; baseline)", f"{c.median(cold):.2f} s", "1.00x", ""],
        ["idefics ask --server (page not cached)", f"{c.median(warm):.2f} s", f"{p10_ratio:.3f}x",
         c.verdict(p10_ratio, 0.25, True)],
    ], ["run", "wall", "ratio", "target"])
    if all(x is not None for x in served):
        print(f"P10 floor: the server's own time for those requests (its access log) is {c.median(served):.2f} s = "
              f"{c.median(served) / c.median(cold):.3f}x of the cold ask; the client adds "
              f"{c.median(warm) - c.median(served):.2f} s", flush=True)
    print(f"answers identical: {'yes' if all(same) else f'no ({sum(same)}/{len(same)})'}", flush=True)
    c.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
