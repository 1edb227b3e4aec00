"""Architecture matrix: compression and agreement with DynamicCache per model family, INT8 and INT4.

Tiny random models built from configs (``tests/model_matrix.py``, no download):
Llama, Mistral (every layer sliding), Qwen2/Qwen3 and Gemma 2/3 (sliding and
full layers), Phi-3, GPT-NeoX, GPT-2, T5, BART, Whisper. A 32-token prompt
(sliding windows of 24), 10 decode steps, 8-token blocks and exact window.
Per row: teacher-forced top-1 agreement and largest logit error (over the
reference logits' range), free-running greedy agreement, the self-attention
cache's compression ratio against what DynamicCache holds, the layers holding
quantized blocks, and the attention path decode steps took. The encoder-decoder
models run again after ``enable_quantized_attention(model)`` (rows
``NAME+kvquant_sdpa``): the attention function the user switches to.

    python benchmarks/architecture_matrix.py
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import Recorder, format_table  # noqa: E402
from hf_kvcache_plugin.attention import enable_quantized_attention  # noqa: E402
from tests.model_matrix import ARCHITECTURES, CACHE_OPTIONS, NEW_TOKENS, PROMPT, WINDOW, build_model, compare  # noqa: E402

ENCODER_DECODER = ("t5", "bart", "whisper")


def _with_quantized_attention(name: str):
    model = build_model(name)
    enable_quantized_attention(model)
    return model


COLUMNS = ("architecture", "quant_type", "top1_agreement", "logit_error", "greedy_agreement", "compression_ratio",
           "quantized_layers", "attention_path", "layer_kinds")  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the expected warnings (softcapping falls back, ...) would drown the table
    recorder = Recorder(
        "architecture_matrix",
        {"prompt": PROMPT, "new_tokens": NEW_TOKENS, "sliding_window": WINDOW, **CACHE_OPTIONS},
    )
    runs = [(name, build_model) for name in ARCHITECTURES]
    runs += [(f"{name}+kvquant_sdpa", _with_quantized_attention) for name in ENCODER_DECODER]
    for label, build in runs:
        name = label.split("+")[0]
        for result in compare(build(name), label):
            row = dataclasses.asdict(result)
            row["layer_kinds"] = ",".join(sorted(set(row["layer_kinds"])))
            row["quantized_layers"] = f"{result.quantized_layers}/{len(result.layer_kinds)}"
            recorder.add(**row)
            print(f"{label} {result.quant_type} done", flush=True)
    print(format_table(recorder.rows, COLUMNS, floatfmt=".4g"))
    recorder.write()


if __name__ == "__main__":
    main()
