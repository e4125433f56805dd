#!/usr/bin/env python3
"""Reproduce the browser page's screenshots (docs/web-*.png) and its speed
figure: SmolLM2-135M-Instruct in web/ on headless Chromium's WebGPU
(SwiftShader), driven like a user would (type the folder, Load, Send,
Verify, then Verify with a porting bug injected), next to native `wgllm run`
on the same prompt and token count.

Standard library only: the page is served from loopback by this script
(web/ at /, the model folder at /models/NAME/), and Chromium is driven over
the DevTools protocol on a pipe (--remote-debugging-pipe), so no WebDriver
or websocket client is needed.

    bash tools/build_web.sh
    python3 tools/web_screenshots.py [--model DIR] [--out docs] [--max-tokens N]

DIR defaults to $WGLLM_CACHE/models/smollm2-135m-instruct (a converted
folder: config.json, model.safetensors, tokenizer files). Prints the page's
chat figures, native's, and whether the two generated the same ids.
"""

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Handler(http.server.SimpleHTTPRequestHandler):
    """web/ at /, the model folder at /models/NAME/."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
    }

    def __init__(self, *a, model_dir, model_name, **kw):
        self.model_dir, self.model_name = model_dir, model_name
        super().__init__(*a, directory=os.path.join(ROOT, "web"), **kw)

    def translate_path(self, path):
        prefix = f"/models/{self.model_name}/"
        p = path.split("?", 1)[0]
        if p.startswith(prefix) and ".." not in p:
            return os.path.join(self.model_dir, p[len(prefix):])
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *a):
        pass


class Cdp:
    """The DevTools protocol over Chromium's --remote-debugging-pipe (fd 3
    reads commands, fd 4 writes replies, each message NUL-terminated)."""

    def __init__(self, chromium, profile):
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()

        def fds():
            # Above 4 first, so neither dup2 overwrites the other's source.
            r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [
            chromium, "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu",
            "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader",
            "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]
        self.proc = subprocess.Popen(args, preexec_fn=fds,
                                     pass_fds=(3, 4, to_child_r, from_child_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        self.next_id = 0
        self.session = None

    def send(self, method, params=None, timeout=900):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buf:
                if time.time() > deadline:
                    raise TimeoutError(f"{method}: no reply in {timeout} s")
                chunk = os.read(self.from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def eval(self, expr, timeout=900):
        r = self.send("Runtime.evaluate", {"expression": expr, "awaitPromise": True,
                                           "returnByValue": True}, timeout)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def screenshot(cdp, path):
    # The whole page: the viewport grows to the document's height.
    h = cdp.eval("document.documentElement.scrollHeight")
    cdp.send("Emulation.setDeviceMetricsOverride",
             {"width": 1000, "height": h, "deviceScaleFactor": 1, "mobile": False})
    png = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"})["data"])
    with open(path, "wb") as f:
        f.write(png)
    print(f"wrote {path} ({len(png) // 1024} KiB, 1000x{h})")


def click_and_wait(cdp, button):
    cdp.eval(f"document.getElementById({json.dumps(button)}).click(); window.pageBusy")
    err = cdp.eval("document.getElementById('error').textContent")
    if err:
        raise RuntimeError(f"the page shows an error after {button}: {err}")


def text(cdp, element):
    return cdp.eval(f"document.getElementById({json.dumps(element)}).textContent")


def set_value(cdp, field, value):
    cdp.eval(f"document.getElementById({json.dumps(field)}).value = {json.dumps(value)}")


def main():
    cache = os.environ.get("WGLLM_CACHE", os.path.expanduser("~/.cache/wgllm"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(cache, "models/smollm2-135m-instruct"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--prompt", default="Write a short poem about the sea.")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--verify-prompt", default="The capital of France is")
    ap.add_argument("--bug", default="rope_interleaved")
    ap.add_argument("--native", default=os.path.join(ROOT, "target/release/wgllm"),
                    help="the wgllm binary for the native figure (skipped when absent)")
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"{a.model}: no config.json (a converted model folder is expected)")
    if not os.path.isfile(os.path.join(ROOT, "web/pkg/wgllm_web_bg.wasm")):
        sys.exit("web/pkg is not built: run bash tools/build_web.sh")
    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("chromium is not installed: run tools/setup.sh")
    # Native before and after the page: on a shared machine the load
    # changes during a run, and the two brackets show by how much.
    natives = [run_native(a)]
    name = os.path.basename(os.path.normpath(a.model))
    handler = functools.partial(Handler, model_dir=os.path.abspath(a.model), model_name=name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    profile = tempfile.mkdtemp(prefix="wgllm-shots-")
    cdp = Cdp(chromium, profile)
    try:
        target = cdp.send("Target.createTarget", {"url": f"http://127.0.0.1:{port}/"})["targetId"]
        cdp.session = cdp.send("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1000, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        for _ in range(600):
            if cdp.eval("window.pageReady === true"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the page did not initialise its wasm module")
        t = time.time()
        set_value(cdp, "url", f"models/{name}/")
        click_and_wait(cdp, "load-url")
        print(f"page: loaded in {time.time() - t:.1f} s: "
              f"{text(cdp, 'model-info')}")
        print(f"page: {text(cdp, 'adapter')}")
        set_value(cdp, "prompt", a.prompt)
        set_value(cdp, "max-tokens", str(a.max_tokens))
        # Twice: the first turn also pays for the browser's first
        # dispatches; New chat drops the history and the cache, so the
        # second prefills the same prompt again.
        for turn in ["first", "second"]:
            click_and_wait(cdp, "send")
            page = cdp.eval("window.lastChat")
            print(f"page, {turn} chat: {text(cdp, 'chat-stats')}")
            print(f"page, {turn} chat: reply {page['text']!r}")
            if turn == "first":
                click_and_wait(cdp, "new-chat")
        set_value(cdp, "verify-prompt", a.verify_prompt)
        t = time.time()
        click_and_wait(cdp, "verify")
        print(f"page: verify in {time.time() - t:.1f} s: "
              f"{text(cdp, 'verify-summary')}")
        screenshot(cdp, os.path.join(a.out, "web-chat-verify.png"))
        set_value(cdp, "bug", a.bug)
        click_and_wait(cdp, "verify")
        print(f"page, {a.bug}: "
              f"{text(cdp, 'verify-summary')}")
        screenshot(cdp, os.path.join(a.out, "web-verify-bug.png"))
    finally:
        cdp.close()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    natives.append(run_native(a))
    for native in filter(None, natives):
        same = native["generated_ids"] == page["generated_ids"]
        print(f"page and native generated the same ids: {same}")
        if not same:
            sys.exit(f"ids differ: page {page['generated_ids']} native {native['generated_ids']}")


def run_native(a):
    """`wgllm run --chat --json` on the same prompt, or None without the binary."""
    if not os.path.isfile(a.native):
        return None
    devices = subprocess.run([a.native, "devices"], capture_output=True, text=True).stdout
    print("native adapter: " + "".join(l for l in devices.splitlines() if "(selected)" in l))
    out = subprocess.run([a.native, "run", "--model", a.model, "--chat", "--prompt", a.prompt,
                          "--max-tokens", str(a.max_tokens), "--json"],
                         capture_output=True, text=True, check=True).stdout
    native = json.loads(out)
    print(f"native: {len(native['prompt_ids'])} prompt tokens, "
          f"{len(native['generated_ids'])} generated; prefill "
          f"{native['prefill_tokens_per_s']:.2f} tok/s, decode "
          f"{native['decode_tokens_per_s']:.2f} tok/s")
    return native


if __name__ == "__main__":
    main()
