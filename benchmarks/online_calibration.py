"""Online calibration with moving statistics (the specification's feature), measured before it is kept.

Keys are grouped per channel: each block of G tokens gets a scale and zero
per channel from its own min/max. The calibrated variant keeps, per layer,
head and channel, an exponential moving average (EMA, weight ``--alpha`` on
the past) of the blocks' min and max, and clips each new block to that
running range widened by ``margin`` times its width before encoding it, so
that a block's outliers no longer set its scale. Values are left as they are.
The first block of a stream only seeds the averages.

Perplexity at the same bits on the held-in TinyStories text (stories260K),
every prediction after a 32-token prefill read through the cache, ``--chunk``
tokens per step, for the current scheme and each calibrated variant, in one
run. The calibration is kept in the package only where it lowers perplexity.

    python benchmarks/online_calibration.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget_quality import perplexity  # noqa: E402
from models import TINYSTORIES_VAL, stories_model  # noqa: E402
from records import Recorder, format_table, set_threads  # noqa: E402

from hf_kvcache_plugin import QuantizedKVCache  # noqa: E402
from hf_kvcache_plugin.blocks import BlockCodec  # noqa: E402
from hf_kvcache_plugin.evaluation import load_token_windows  # noqa: E402


class EmaClippedCodec:
    """A key codec that clips each block, per channel, to the running (EMA) range of the blocks before it."""

    def __init__(self, codec: BlockCodec, alpha: float, margin: float):
        self.codec, self.alpha, self.margin = codec, alpha, margin
        self.low: torch.Tensor | None = None  # [B, H, D]
        self.high: torch.Tensor | None = None
        self.clipped = 0  # values clipped so far
        self.seen = 0

    def __getattr__(self, name):  # bits, group_size, block_nbytes, ... as the wrapped codec
        return getattr(self.codec, name)

    def encode(self, tokens: torch.Tensor, bits: int | None = None):
        b, h, length, d = tokens.shape
        blocks = tokens.reshape(b, h, length // self.codec.group_size, self.codec.group_size, d).clone()
        for i in range(blocks.shape[2]):
            block = blocks[:, :, i]
            lo, hi = block.amin(dim=2), block.amax(dim=2)  # [B, H, D], before clipping
            if self.low is not None:
                width = self.high - self.low
                floor, ceiling = self.low - self.margin * width, self.high + self.margin * width
                clipped = torch.maximum(torch.minimum(block, ceiling.unsqueeze(2)), floor.unsqueeze(2))
                self.clipped += int((clipped != block).sum())
                blocks[:, :, i] = clipped
                self.low = self.alpha * self.low + (1 - self.alpha) * lo
                self.high = self.alpha * self.high + (1 - self.alpha) * hi
            else:
                self.low, self.high = lo.clone(), hi.clone()
            self.seen += block.numel()
        return self.codec.encode(blocks.reshape(b, h, length, d), bits)


def calibrated_cache(cfg, quant_type: str, alpha: float, margin: float, codecs: list, **options) -> QuantizedKVCache:
    cache = QuantizedKVCache(cfg, quant_type, **options)
    for layer in cache.layers:
        initialize = layer.lazy_initialization

        def lazy_initialization(key_states, value_states, layer=layer, initialize=initialize):
            initialize(key_states, value_states)
            layer.quantized_keys.codec = EmaClippedCodec(layer.quantized_keys.codec, alpha, margin)
            codecs.append(layer.quantized_keys.codec)

        layer.lazy_initialization = lazy_initialization
    return cache


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 window, int4, one variant")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--bits", nargs="+", default=["int4", "int2"])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.9])
    p.add_argument("--margins", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.quick:
        args.windows, args.bits, args.alphas, args.margins = 1, ["int4"], [0.9], [0.0]
    model, tok = stories_model()
    cfg = model.config
    windows = load_token_windows(tok, TINYSTORIES_VAL, window=511, num_windows=args.windows)
    options = {"group_size": 8, "residual_length": 16}
    settings = {"model": "stories260K", "text": TINYSTORIES_VAL.name, "windows": args.windows, "prompt": args.prompt,
                "chunk": args.chunk, **options}  # fmt: skip
    rec = Recorder("online_calibration" + ("_quick" if args.quick else ""), settings, args.out)
    base, _ = perplexity(model, windows, lambda: DynamicCache(config=cfg), args.prompt, args.chunk)
    rec.extra["dynamic_perplexity"] = base
    for quant_type in args.bits:
        current, _ = perplexity(model, windows, lambda: QuantizedKVCache(cfg, quant_type, **options), args.prompt,
                                args.chunk)  # fmt: skip
        rec.add(quant_type=quant_type, scheme="current (block min/max)", perplexity=current, ppl_vs_current=1.0,
                clipped_fraction=0.0)  # fmt: skip
        for alpha in args.alphas:
            for margin in args.margins:
                codecs: list = []
                make = lambda: calibrated_cache(cfg, quant_type, alpha, margin, codecs, **options)  # noqa: E731
                ppl, _ = perplexity(model, windows, make, args.prompt, args.chunk)
                clipped = sum(c.clipped for c in codecs) / max(1, sum(c.seen for c in codecs))
                rec.add(quant_type=quant_type, scheme=f"EMA clip (alpha {alpha}, margin {margin})", perplexity=ppl,
                        ppl_vs_current=ppl / current, clipped_fraction=clipped)  # fmt: skip
                print(f"{quant_type} alpha {alpha} margin {margin}: {ppl:.4f} (current {current:.4f})")
    print(f"DynamicCache perplexity {base:.4f}")
    print(format_table(rec.rows, ["quant_type", "scheme", "perplexity", "ppl_vs_current", "clipped_fraction"],
                       floatfmt=".4g"))  # fmt: skip
    rec.write()
    return {"rows": rec.rows, "dynamic": base}


if __name__ == "__main__":
    main()
