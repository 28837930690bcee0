#!/usr/bin/env python
"""Samples from a checkpoint or export (MD4, GenMD4, Prime): text, or a PNG grid for pixel data.

    python launcher/sample.py exports/md4_tiny --num 4                                  # unconditional
    python launcher/sample.py exports/md4_tiny --prefix "The kernel" --top-p 0.98
    python launcher/sample.py exports/md4_tiny --infill "The [MASK] is loaded at boot [MASK]." --infill-len 6
    python launcher/sample.py exports/md4_tiny --length 512 --stride 64                # beyond the context
    python launcher/sample.py exports/cifar_md4 --num 16 --out samples.png             # tokenizer 'pixels'

Text is decoded with data_pipeline.tokenizer.get_encoding(<the run's tokenizer>); a tokenizer without a
text codec (synthetic ids) reads and prints space-separated ids. --length > seq_len generates with the
semi-autoregressive sliding window (model.diffusion.samplers.semi_autoregressive): each new window keeps the
last seq_len - stride tokens as its prefix. Pixel data: the tokens of a sample are an image of the
manifest's image_shape [H, W, C] (values 0..255), written as one PNG grid.

Prints the samples, then a final JSON line with the samples, their token ids, the tokenizer and the network
calls used. `--out X.jsonl` writes one JSON record per sample ({"text", "tokens", "tokenizer", "model", ...});
launcher/evaluate_samples.py computes the generative perplexity and unigram entropy of either.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MASK_MARK = "[MASK]"


from launcher.argtypes import POSITIVE, bounded as _bounded  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export directory, run directory, checkpoints/ folder or step_XXXXXXXX folder")
    p.add_argument("--num", type=POSITIVE, default=1, help="number of samples")
    p.add_argument("--steps", type=POSITIVE, default=None, help="sampling steps (default: the run's sampler.steps)")
    p.add_argument("--grid", choices=("cosine", "uniform"), default=None)
    p.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=None)
    p.add_argument("--temperature", type=_bounded(float, 0.0, low_open=True, what="> 0"), default=None)
    p.add_argument("--no-cache", action="store_true", help="call the network at every step")
    p.add_argument("--prefix", default=None, help="fixed text at the start")
    p.add_argument("--suffix", default=None, help="fixed text at the end")
    p.add_argument("--infill", default=None, help=f"text with {MASK_MARK} gaps to fill (at the start of the sample)")
    p.add_argument("--infill-len", type=POSITIVE, default=8, help=f"tokens per {MASK_MARK} gap")
    p.add_argument("--length", type=POSITIVE, default=None, help="tokens per sample; > seq_len uses the sliding window")
    p.add_argument("--stride", type=POSITIVE, default=None, help="new tokens per window (default seq_len // 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples here: X.jsonl (one JSON record per sample: text, "
                   "token ids, tokenizer; what launcher/evaluate_samples.py reads best), a text file (samples "
                   "separated by a blank line), or .png for pixel data")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--raw", action="store_true", help="checkpoint: the trained weights, not the EMA")
    which.add_argument("--ema", action="store_true", help="checkpoint: the EMA weights (default when present)")
    return p.parse_args(argv)


class Codec:
    """Text <-> ids with the run's tokenizer; space-separated ids when it has no text codec."""

    def __init__(self, name: str):
        from data_pipeline.tokenizer import get_encoding

        try:
            self.enc = get_encoding(name)
        except ValueError:
            self.enc = None

    def encode(self, text: str) -> list[int]:
        if self.enc is None:
            return [int(t) for t in text.split()]
        if not hasattr(self.enc, "encode"):      # text8's character codec has only the ordinary encoder
            return [int(t) for t in self.enc.encode_ordinary(text)]
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids)) if self.enc is None else self.enc.decode(ids)


def build_given(codec: Codec, length: int, vocab_size: int, prefix=None, suffix=None, infill=None,
                infill_len: int = 8) -> torch.Tensor | None:
    """[1, length] fixed token ids, -1 where the sampler is free; None when nothing is fixed."""
    given = torch.full((1, length), -1, dtype=torch.long)
    fixed = False
    if infill is not None:
        ids: list[int] = []
        for k, part in enumerate(infill.split(MASK_MARK)):
            if k:
                ids += [-1] * infill_len
            if part:
                ids += codec.encode(part)
        prefix_ids = ids
    else:
        prefix_ids = codec.encode(prefix) if prefix else []
    suffix_ids = codec.encode(suffix) if suffix else []
    if len(prefix_ids) + len(suffix_ids) > length:
        raise ValueError(f"the fixed text has {len(prefix_ids) + len(suffix_ids)} tokens, more than --length {length}")
    if prefix_ids:
        given[0, : len(prefix_ids)] = torch.tensor(prefix_ids)
        fixed = True
    if suffix_ids:
        given[0, length - len(suffix_ids):] = torch.tensor(suffix_ids)
        fixed = True
    bad = given >= vocab_size
    if bad.any():
        raise ValueError(f"fixed token id {int(given[bad][0])} is outside the model's vocabulary of {vocab_size}")
    return given if fixed else None


def image_shape_of(cfg, meta: dict) -> list[int] | None:
    shape = ((meta or {}).get("data") or {}).get("image_shape")
    if shape is None:
        try:
            from data_pipeline.manifest import load_manifest

            shape = load_manifest(cfg.data.path).get("image_shape")
        except (ValueError, OSError):
            shape = None
    return list(shape) if shape else None


def save_grid(tokens: torch.Tensor, shape: list[int], path: str | Path) -> Path:
    """tokens [num, H*W*C] in 0..255 -> one PNG with the images in a near-square grid (launcher/visual.py)."""
    from launcher.visual import image_grid, save_png

    return save_png(image_grid(tokens.cpu(), shape), path)


def sampler_settings(sc) -> dict:
    """The `sampler` config section as draw_samples' keyword arguments."""
    return dict(steps=sc.steps, grid=sc.grid, top_p=sc.top_p, temperature=sc.temperature, use_cache=sc.use_cache)


def show_samples(tokens: torch.Tensor, tokenizer: str, image_shape, step: int, run_dir: str | Path, writer,
                 is_main: bool) -> str:
    """Training-time samples into the run: an image grid (<run_dir>/samples/step_N.png and TensorBoard) for
    pixel data, else the decoded texts in TensorBoard. Returns the PNG path or the first text."""
    if image_shape is not None:
        from launcher.visual import image_grid

        shown = str(Path(run_dir) / "samples" / f"step_{step:08d}.png")
        if is_main:
            save_grid(tokens, image_shape, shown)
            writer.add_image("samples/images", image_grid(tokens.cpu(), image_shape), step, dataformats="HWC")
        return shown
    codec = Codec(tokenizer)     # a tokenizer without a text decoder (synthetic ids): the ids
    texts = [codec.decode(row.tolist()) for row in tokens]
    if writer is not None:
        writer.add_text("samples/unconditional", "\n\n---\n\n".join(texts), step)
    return texts[0]


@torch.no_grad()
def generate(model, cfg, num: int, length: int, *, steps: int, grid: str, top_p, temperature: float,
             use_cache: bool = True, given: torch.Tensor | None = None, stride: int | None = None,
             seed: int = 0) -> tuple[torch.Tensor, dict]:
    """num samples of `length` tokens from a plain denoiser (any kind); the sliding window past seq_len."""
    from model.diffusion.samplers import semi_autoregressive
    from model.objectives import draw_samples, make_objective

    objective = make_objective(cfg, model)
    device = next(model.parameters()).device
    n_ctx = cfg.model.seq_len

    def denoiser(ids: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return model(ids.to(device), t=t.to(device) if t is not None else None).float().cpu()

    g = torch.Generator().manual_seed(seed)

    def window(window_given: torch.Tensor | None, n: int = n_ctx):
        return draw_samples(objective, denoiser, num, n, steps=steps, grid=grid, top_p=top_p,
                            temperature=temperature, use_cache=use_cache, given=window_given, generator=g)

    if length <= n_ctx:
        return window(given, length)
    stride = stride or max(1, n_ctx // 2)
    return semi_autoregressive(window, num, length, n_ctx, stride, given)


def main(argv=None) -> int:
    a = parse_args(argv)
    from launcher.export import ExportError, load_plain

    try:
        model, cfg, meta = load_plain(a.model, "raw" if a.raw else "ema" if a.ema else None)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    sc = cfg.sampler
    pixels = cfg.data.tokenizer == "pixels"
    length = a.length or cfg.model.seq_len
    if a.stride is not None and a.stride > cfg.model.seq_len:
        print(f"error: --stride {a.stride}: must be at most the model's seq_len ({cfg.model.seq_len})", file=sys.stderr)
        return 2
    codec = Codec(cfg.data.tokenizer)
    try:
        given = build_given(codec, length, cfg.model.vocab_size, a.prefix, a.suffix, a.infill, a.infill_len)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens, stats = generate(model, cfg, a.num, length, steps=a.steps or sc.steps, grid=a.grid or sc.grid,
                             top_p=a.top_p if a.top_p is not None else sc.top_p,
                             temperature=a.temperature if a.temperature is not None else sc.temperature,
                             use_cache=sc.use_cache and not a.no_cache, given=given, stride=a.stride, seed=a.seed)
    record = {"model": str(a.model), "diffusion": cfg.diffusion.kind, "tokenizer": cfg.data.tokenizer,
              "num": a.num, "length": length,
              "network_calls": stats["network_calls"], "windows": stats.get("windows", 1),
              "steps": a.steps or sc.steps}
    if pixels:
        shape = image_shape_of(cfg, meta)
        if shape is None or math.prod(shape) != length:
            print(f"error: pixel data needs an image_shape with H*W*C = {length} (export config.json data.image_shape "
                  f"or the manifest of {cfg.data.path}); found {shape}", file=sys.stderr)
            return 2
        out = save_grid(tokens, shape, a.out or "samples.png")
        record.update(png=str(out), image_shape=shape)
        print(f"wrote {a.num} images to {out}", file=sys.stderr)
    else:
        texts = [codec.decode(row.tolist()) for row in tokens]
        for i, t in enumerate(texts):
            print(f"----- sample {i} -----\n{t}", file=sys.stderr)
        if a.out and Path(a.out).suffix.lower() == ".jsonl":   # one record per sample: exact ids and boundaries
            Path(a.out).write_text("".join(json.dumps({"text": t, "tokens": row.tolist(), "tokenizer": cfg.data.tokenizer,
                                                       "model": str(a.model), "diffusion": cfg.diffusion.kind,
                                                       "steps": a.steps or sc.steps}) + "\n"
                                           for t, row in zip(texts, tokens)))
            record["out"] = a.out
        elif a.out:
            Path(a.out).write_text("\n\n".join(texts) + "\n")
            record["out"] = a.out
        record["samples"] = texts
        record["tokens"] = tokens.tolist()
    print(f"network calls: {stats['network_calls']}", file=sys.stderr)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
