"""`transformers serve` on a model folder carrying the custom_generate recipe, asked by the official `openai` client.

Copies ../shared/models/stories260K to a temporary folder, writes the recipe into it
(`write_custom_generate`) with a line that records that it ran, starts
`transformers serve FOLDER --trust-remote-code`, sends one completion request,
and prints the answer and whether the recipe ran. (stories260K has no chat
template, so chat completions are refused by the server for that reason alone.)

    python examples/transformers_serve_with_recipe.py [--port 18765]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from hf_kvcache_plugin import write_custom_generate

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO.parent / "shared" / "models" / "stories260K"
SERVE = Path(sys.executable).parent / "transformers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--startup-timeout", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "stories260K"
        shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("original", "*.py", "README.md"))
        recipe = write_custom_generate(model) / "generate.py"
        marker = Path(tmp) / "recipe_ran"
        # the served recipe, plus a line that leaves a file behind when it runs
        recipe.write_text(recipe.read_text() + (
            f"\n_recipe = generate\n\ndef generate(*args, model, **kwargs):\n"
            f"    open({str(marker)!r}, 'w').close()\n    return _recipe(*args, model=model, **kwargs)\n"
        ))
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen([str(SERVE), "serve", str(model), "--trust-remote-code", "--port", str(args.port),
                                   "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + args.startup_timeout
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/models", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        sys.exit(f"the server did not start; see {log.name}")
                    time.sleep(1)
            client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", timeout=1200)
            answer = client.completions.create(model=str(model), prompt="Once upon a time", max_tokens=8)
            print("answer:", repr(answer.choices[0].text))
            print("the recipe ran:", marker.exists())
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
