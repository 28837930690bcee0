"""lm-evaluation-harness model `mdiff`: a masked-diffusion export (MD4, GenMD4, Prime) scored through its ELBO.

    python -m launcher.lm_eval --model mdiff --model_args path=exports/md4_tiny,draws=4 --tasks lambada_openai
    python -m launcher.lm_eval --model mdiff --model_args path=EXPORT,draws=K,batch_size=B,seed=S --tasks ...

Importing this module registers `mdiff` in lm-eval's model registry (lm_eval.api.registry.register_model);
`python -m launcher.lm_eval` imports it and hands the command line to lm-eval's own CLI. A plain
`lm_eval --model mdiff` cannot find the model: lm-eval 0.4.13 has no plugin or entry-point discovery of
models (its registry holds only the names in lm_eval/models/__init__.py and what imported code registers).

model_args: path (an export directory of launcher/export.py, or a run / checkpoint directory as
launcher/evaluate.py takes), draws (K >= 1 Monte Carlo draws of t per window, default 1), batch_size (windows
per forward; without it lm-eval's --batch_size, which is 1 unless given; 16 for auto or none at all), seed (the noise seed,
default the run's run.seed, as evaluate.py), steps (sampler steps for generate_until, default the run's
sampler.steps), max_gen_toks (default 256), weights (raw | ema, for checkpoints), device (default cuda if
available; lm-eval's --device is used when model_args has none, cpu when it names CUDA and there is none).
lm-eval's max_batch_size is accepted and not used.

THE NUMBERS ARE BOUNDS, NOT EXACT LOG-LIKELIHOODS. A masked-diffusion model has no tractable
log p(continuation | context); what it has is the negative ELBO, an upper bound on -log p:
- loglikelihood(context, continuation) returns (-bound, is_greedy), where bound is the negative ELBO of
  the continuation with only the continuation's tokens ever masked (the context is given at every t, never
  masked: the estimator LLaDA uses), estimated with K antithetic draws of t and the noise of the held-out
  bound (model.objectives.heldout_nelbo: noise keyed by the window's tokens and the seed, so a request's
  number does not depend on the batch it is in). -bound <= log p in expectation; with K draws it is a
  Monte Carlo estimate of that lower bound on log p. Accuracy from comparing choices is therefore a
  comparison of bounds. is_greedy: every continuation token is the argmax of the model's prediction with
  the whole continuation masked (t = 1).
  context + continuation longer than the model's seq_len: the continuation and the most recent context
  are kept (left truncation); a continuation longer than seq_len is scored in windows of seq_len, each
  conditioned on the tokens just before it (the chain rule over windows).
- loglikelihood_rolling(text): the full-sequence bound, the text cut into consecutive windows of seq_len
  tokens, each scored with every position maskable (exactly launcher/evaluate.py's per-row bound, so on a
  prepared text the sum equals evaluate.py's nats for the same rows, draws and seed); a last partial window
  of r tokens is scored as the last r tokens given the seq_len - r before them. word/byte perplexities and
  bits per byte that lm-eval derives from it are upper bounds too.
- Windows shorter than seq_len are run at their own length (no padding), as LLaDA does.
- generate_until(context, gen_kwargs): the model's ancestral sampler (launcher/sample.generate, i.e.
  model/diffusion/samplers.py) with the context tokens as a fixed prefix and max_gen_toks free positions
  after it (the context is left-truncated to seq_len - max_gen_toks; past seq_len the sampler's sliding
  window); the text is cut at the end-of-text token and at the first of the `until` strings.
  do_sample false (lm-eval's and transformers' default) means greedy: each position takes its most likely
  token when it unmasks (top-p -> 0; positions still unmask at the seeded random times of the sampler);
  do_sample true samples with gen_kwargs temperature / top_p or the run's sampler settings.
  The sampler's randomness is seeded by the seed and the context's tokens.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
GREEDY_TOP_P = 1e-12      # top-p this small keeps only the most likely token: argmax at every unmasking


def windows(context: list[int], continuation: list[int], seq_len: int) -> list[tuple[list[int], int]]:
    """The windows that score `continuation` given `context`: [(tokens, number of given tokens)], each at most
    seq_len long, the maskable tokens at its end. The continuation is cut from its start into pieces of
    seq_len; each piece is preceded by as many of the tokens before it as fit (left truncation)."""
    if not continuation:
        return []
    out = []
    full = list(context) + list(continuation)
    start = len(context)
    while start < len(full):
        piece = min(seq_len, len(full) - start)
        given = min(start, seq_len - piece)
        out.append((full[start - given:start + piece], given))
        start += piece
    return out


class _ArgError(ValueError):
    pass


def _int_arg(name: str, value, minimum: int = 1) -> int:
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise _ArgError(f"mdiff: model_args {name}={value!r}: must be an integer >= {minimum}") from None
    if v < minimum:
        raise _ArgError(f"mdiff: model_args {name}={value!r}: must be an integer >= {minimum}")
    return v


@register_model("mdiff")
class MDiffLM(TemplateLM):
    """lm-eval LM over a plain denoiser (model/plain.py) of an export or checkpoint; see the module docstring."""

    backend = "causal"     # TemplateLM._encode_pair: encode context + continuation whole, then split

    def __init__(self, path=None, draws=1, batch_size=None, seed=None, steps=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
                 weights=None, device=None, max_batch_size=None, *, model=None, cfg=None, meta=None, **unknown):
        super().__init__()
        if unknown:
            raise _ArgError(f"mdiff: unknown model_args {sorted(unknown)}; known: path, draws, batch_size, seed, "
                            f"steps, max_gen_toks, weights, device")
        if model is None:
            if path is None or str(path).strip() == "":
                raise _ArgError("mdiff: model_args needs path=EXPORT (an export directory written by "
                                "launcher/export.py, or a run / checkpoint directory)")
            if weights not in (None, "raw", "ema"):
                raise _ArgError(f"mdiff: model_args weights={weights!r}: must be raw or ema")
            from launcher.export import ExportError, load_plain

            if not Path(str(path)).exists():
                raise _ArgError(f"mdiff: model_args path={path}: no such file or directory")
            try:
                model, cfg, meta = load_plain(str(path), weights)
            except ExportError as e:
                raise _ArgError(f"mdiff: model_args path={path}: not a loadable export or checkpoint: {e}") from None
        elif cfg is None:
            raise _ArgError("mdiff: a model passed in-process needs its cfg")
        self.draws = _int_arg("draws", draws)
        self.batch_size = self._batch_size(batch_size)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.seed = cfg.run.seed if seed is None else _int_arg("seed", seed, minimum=0)
        self.sampler_steps = cfg.sampler.steps if steps is None else _int_arg("steps", steps)
        self.path = None if path is None else str(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device (default cuda) to every model; model_args device=... wins over it
            import logging

            logging.getLogger(__name__).warning("mdiff: device %s requested but CUDA is not available: using cpu",
                                                device)
            device = "cpu"
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.cfg, self.meta = cfg, meta or {}
        self.seq_len = cfg.model.seq_len
        self.vocab_size = cfg.model.vocab_size
        from launcher.sample import Codec
        from model.objectives import make_objective

        self.objective = make_objective(cfg, self.model)
        self.codec = Codec(cfg.data.tokenizer)
        self._eos = self._eos_id()

    # ----- construction from lm-eval's arguments -----------------------------------------------------

    @staticmethod
    def _batch_size(value) -> int:
        if value is None or (isinstance(value, str) and value.startswith("auto")):
            return DEFAULT_BATCH_SIZE
        return _int_arg("batch_size", value)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over lm-eval's own --batch_size / --device (which are always passed, 1 by default)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def from_model(cls, model, cfg, **kwargs) -> "MDiffLM":
        """In-process: any module with the plain denoiser's contract (model/plain.py forward) and its config."""
        return cls(model=model, cfg=cfg, **kwargs)

    # ----- tokenizer -----------------------------------------------------------------------------------

    def _eos_id(self):
        eos = (self.meta.get("data") or {}).get("eos_id")
        if eos is None:
            from data_pipeline.tokenizer import KNOWN_TOKENIZERS

            eos = KNOWN_TOKENIZERS.get(self.cfg.data.tokenizer, (None, None))[1]
        return eos

    @property
    def eot_token_id(self):
        return self._eos

    @property
    def tokenizer_name(self) -> str:
        return self.cfg.data.tokenizer

    @property
    def max_length(self) -> int:
        return self.seq_len

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        ids = self.codec.encode(string)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"mdiff: token id {bad[0]} of {string[:40]!r} is outside the model's vocabulary of "
                             f"{self.vocab_size}")
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.codec.decode(list(ids))

    # ----- scoring -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _greedy(self, x0: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """[B] bool: every maskable token is the argmax of the logits with all maskable positions masked (t = 1).
        Full logits are [rows, L, V]: computed for as many rows at a time as fit in 2^28 floats."""
        rows = max(1, (1 << 28) // (x0.shape[1] * self.vocab_size))
        out = []
        for j in range(0, x0.shape[0], rows):
            x, m = x0[j:j + rows], maskable[j:j + rows]
            inputs = {k: v.to(self._device) for k, v in self.objective.masked_inputs(x, m).items()}
            pred = self.model(**inputs)[..., : self.vocab_size].argmax(-1)
            out.append(((pred == x) | ~m).all(-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _score_windows(self, wins: list[tuple[list[int], int]], disable_tqdm: bool = True, desc: str = "mdiff",
                       greedy_too: bool = True):
        """[(tokens, given)] -> (negative ELBO in nats, greedy) per window; windows of equal length are batched.
        greedy_too=False (rolling: lm-eval does not use it) skips the argmax pass and reports True."""
        from tqdm import tqdm

        from model.objectives import heldout_nelbo

        nelbo = [0.0] * len(wins)
        greedy = [True] * len(wins)
        by_len: dict[int, list[int]] = {}
        for i, (tokens, _) in enumerate(wins):
            by_len.setdefault(len(tokens), []).append(i)
        batches = [idx[j:j + self.batch_size] for _, idx in sorted(by_len.items())
                   for j in range(0, len(idx), self.batch_size)]
        for idx in tqdm(batches, desc=desc, disable=disable_tqdm, unit="batch"):
            x0 = torch.tensor([wins[i][0] for i in idx], dtype=torch.long)
            given = torch.tensor([wins[i][1] for i in idx], dtype=torch.long)
            maskable = torch.arange(x0.shape[1])[None, :] >= given[:, None]
            x0, maskable = x0.to(self._device), maskable.to(self._device)
            per_row = heldout_nelbo(self.model, self.objective, x0, self.draws, self.seed, maskable=maskable)
            hit = self._greedy(x0, maskable) if greedy_too else torch.ones(len(idx), dtype=torch.bool)
            for k, i in enumerate(idx):
                nelbo[i] = float(per_row[k])
                greedy[i] = bool(hit[k])
        return nelbo, greedy

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str,
               greedy_too: bool = True):
        """[(context ids, continuation ids)] -> [(-bound in nats, is_greedy)]."""
        owner, wins = [], []
        for r, (ctx, cont) in enumerate(pairs):
            for w in windows(ctx, cont, self.seq_len):
                owner.append(r)
                wins.append(w)
        nelbo, greedy = self._score_windows(wins, disable_tqdm, desc, greedy_too)
        out = [[0.0, True] for _ in pairs]
        for r, b, g in zip(owner, nelbo, greedy):
            out[r][0] -= b
            out[r][1] = out[r][1] and g
        return [(float(ll), bool(g)) for ll, g in out]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for context, continuation in (req.args for req in requests):
            if context == "":
                cont = self.tok_encode(continuation)
                pairs.append(([self._eos] if self._eos is not None else [], cont))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self._score(pairs, disable_tqdm, "mdiff loglikelihood (ELBO bound)")

    def _loglikelihood_tokens(self, requests, **kwargs):
        """TemplateLM's hook: [((context, continuation), context ids, continuation ids)]."""
        return self._score([(c, x) for _, c, x in requests], kwargs.get("disable_tqdm", True),
                           "mdiff loglikelihood (ELBO bound)")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        pairs = [([], self.tok_encode(req.args[0])) for req in requests]
        return [ll for ll, _ in self._score(pairs, disable_tqdm, "mdiff rolling (ELBO bound)", greedy_too=False)]

    # ----- generation ----------------------------------------------------------------------------------

    def _request_seed(self, context: list[int]) -> int:
        digest = hashlib.blake2b(torch.tensor(context, dtype=torch.long).numpy().tobytes(), digest_size=8,
                                 key=self.seed.to_bytes(8, "little")).digest()
        return int.from_bytes(digest, "little") & ((1 << 62) - 1)

    @torch.no_grad()
    def generate_tokens(self, context: list[int], max_gen_toks: int, *, greedy: bool = True,
                        temperature: float | None = None, top_p: float | None = None) -> list[int]:
        """max_gen_toks new token ids after `context` (a fixed prefix) from the model's sampler."""
        from launcher.sample import generate

        n = self.seq_len
        keep = n - max_gen_toks if max_gen_toks < n else n - max(1, n // 2)   # the sliding window keeps n - stride
        ctx = list(context)[-keep:] if keep > 0 else []
        length = len(ctx) + max_gen_toks
        given = torch.full((1, length), -1, dtype=torch.long)
        if ctx:
            given[0, :len(ctx)] = torch.tensor(ctx)
        sc = self.cfg.sampler
        tokens, _ = generate(self.model, self.cfg, 1, length, steps=self.sampler_steps, grid=sc.grid,
                             top_p=GREEDY_TOP_P if greedy else (top_p if top_p is not None else sc.top_p),
                             temperature=1.0 if greedy else (temperature or sc.temperature),
                             use_cache=sc.use_cache, given=given if ctx else None, seed=self._request_seed(ctx))
        return tokens[0, len(ctx):].tolist()

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="mdiff generate_until", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = _int_arg("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = kwargs.pop("temperature", None)
            do_sample = kwargs.pop("do_sample", None)
            top_p = kwargs.pop("top_p", None)
            greedy = not do_sample if do_sample is not None else not (temperature and float(temperature) > 0)
            ids = self.generate_tokens(self.tok_encode(context) if context else [], max_gen, greedy=greedy,
                                       temperature=float(temperature) if temperature else None,
                                       top_p=float(top_p) if top_p else None)
            if self._eos is not None and self._eos in ids:
                ids = ids[:ids.index(self._eos)]
            text = self.tok_decode(ids)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out

    def get_model_info(self) -> dict:
        return {"mdiff_path": self.path, "diffusion": self.cfg.diffusion.kind, "seq_len": self.seq_len,
                "draws": self.draws, "seed": self.seed, "loglikelihood": "negative-ELBO bound (not exact)"}


__all__ = ["MDiffLM", "windows", "GREEDY_TOP_P"]
