"""The first command on a fresh machine: an installed copy of the package, offline, no ../shared beside it.

The package is built into a wheel from a copy of the sources (setup.cfg's
package data decides what it carries), unpacked into a temporary directory
and run from there with ``HF_HUB_OFFLINE=1``: the embedded model has to come
with it, and no file of this checkout or of ``../shared`` may be needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = "hf_kvcache_plugin/embedded/stories260K/"
MEMORY_LINE = re.compile(r"^\[kv cache\] int4: [\d.]+ \w+ for \d+ tokens vs DynamicCache [\d.]+ \w+ in torch\.float32 "
                         r"\(([\d.]+)x smaller\)$")


def test_cli_generates_offline_from_an_installed_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hf_kvcache_plugin", src / "hf_kvcache_plugin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        archive.extractall(site)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "LICENSE"):
        assert EMBEDDED + name in shipped, name

    work = tmp_path / "work"
    work.mkdir()
    assert not (work.parent / "shared").exists()
    # the C++ decode kernel is left out: its JIT build keys on the source's path, so a copy would rebuild it
    # (tens of seconds here); this test is about what the copy carries, not about the kernel
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_KVCACHE_CPU_KERNEL": "0"}
    # main() of the unpacked copy, as the console script calls it; it says where it was imported from
    config = work / "int4.yaml"
    config.write_text("cache: {quant_type: int4, residual_length: 16}\n")  # blocks get quantized in a short run
    run_cli = "import sys, hf_kvcache_plugin.app.cli as cli; print(cli.__file__, file=sys.stderr); sys.exit(cli.main())"
    proc = subprocess.run(
        [sys.executable, "-c", run_cli, "--log-level", "info", "generate", "--prompt", "Once upon a time",
         "--config", str(config), "--max-new-tokens", "40"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == str(site / "hf_kvcache_plugin" / "app" / "cli.py")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("Once upon a time") and len(" ".join(lines[:-1]).split()) > 10, proc.stdout
    memory = MEMORY_LINE.match(lines[-1])
    assert memory, lines[-1]
    assert float(memory.group(1)) > 1.0  # past the 16 exact tokens: blocks were quantized
    assert "the model now runs 'kvquant_sdpa'" in proc.stderr
