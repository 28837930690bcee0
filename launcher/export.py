#!/usr/bin/env python
"""Export a training checkpoint of any layout to one safetensors file + config.json, and back.

    python launcher/export.py runs/md4_tiny_demo --out exports/md4_tiny        # newest verified checkpoint, EMA if any
    python launcher/export.py runs/x/checkpoints/step_00000500 --out e --raw --dtype bf16
    python launcher/export.py runs/md4_tiny_demo --out exports/md4_tiny --hf   # + transformers files
    python launcher/export.py exports/md4_tiny --hf                            # the same, to an export in place

What a checkpoint holds (DeepSpeed 0.19.8, ZeRO 1/2, as launcher/checkpoint.py writes it): per model-parallel
rank one `mp_rank_XX_model_states.pt` (written by data-parallel rank 0) whose `module` is that rank's
full-precision shard of the megatron model, with the training job's client state (`step`, `tokens_seen`, and
`ema`: {"decay", "shadow": {name: fp32 shard}} when optim.ema_decay > 0) merged in at the top level.
The ZeRO optimizer files are not needed. Files load with torch.load(weights_only=True).

Consolidation (megatron-core local spec, num_query_groups = num_attention_heads):
  tensor shards are joined along the dimension megatron splits each parameter on, as training recorded it
      from megatron's own `partition_dim` attributes in the checkpoint's tp_split.json
      (launcher.parallelize.split_dims_by_stage): column-parallel layers (word embeddings and output layer,
      vocab-parallel; linear_qkv, each rank's heads contiguous, each head's rows [q; k; v]; linear_fc1; their
      biases) along dim 0, row-parallel ones (linear_proj, linear_fc2) along dim 1; the rest is replicated.
  pipeline stages: stage p's decoder.layers.i is global layer p * L / PP + i; with interleaved stages
      (parallel.virtual_pipeline = VPP > 1) the module holds model chunks and chunk c's
      chunks.c.decoder.layers.i is global layer (c * PP + p) * L / (PP * VPP) + i (megatron's own offsets:
      launcher.parallelize.global_parameter_name, which training's CPU initialisation uses too).
  vocabulary padding is stripped: word embeddings keep V + 1 rows (the mask id is V), the output V.

The export directory:
  model.safetensors   tensor names as in model/plain.py (= the megatron names at TP = PP = 1, unpadded)
  config.json         {"format": "mdiff-export", "config": the resolved training config, "weights": ema|raw,
                       "dtype", "step", "tokens_seen", "code_version", "source": {...}, "sha256": ...}
  with --hf also       transformers' keys merged into config.json, the tokenizer files and the modeling code,
                       so that AutoModelForMaskedLM / AutoTokenizer load the directory (launcher/hf_export.py);
                       `python launcher/export.py EXPORT --hf` adds them to an existing export in place

`load_plain(path)` gives a model/plain.PlainDenoiser from an export or a checkpoint; `load_into_megatron`
(checkpoint.init_from) slices an export into this rank's TP/PP shard of a training model.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python launcher/export.py` puts launcher/ first, not the repo root
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

EXPORT_FORMAT = "mdiff-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_SHARD = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?_model_states\.pt$")


class ExportError(RuntimeError):
    """A checkpoint or export that cannot be read; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Finding and reading a checkpoint
# ---------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run directory, its checkpoints/ folder or one step_XXXXXXXX folder -> (tag dir, run config.yaml).
    Run or checkpoints folder: the newest checkpoint that verifies against its COMPLETE.json."""
    from launcher import checkpoint

    path = Path(path)
    if checkpoint.TAG_RE.match(path.name):
        tag_dir = path
        problem = checkpoint.verify(tag_dir)
        if problem is not None:
            raise ExportError(f"checkpoint {tag_dir} is torn or incomplete: {problem}")
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if not root.is_dir():
            raise ExportError(f"{path}: no such run, checkpoints or checkpoint directory")
        tag, skipped = checkpoint.newest_verified(root)
        if tag is None:
            detail = "; ".join(skipped) if skipped else f"no step_XXXXXXXX folder with {checkpoint.COMPLETE}"
            raise ExportError(f"{root}: no verified checkpoint ({detail})")
        tag_dir = root / tag
        for why in skipped:
            print(f"WARNING: skipping checkpoint {why}", file=sys.stderr)
    cfg_path = tag_dir.parent.parent / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path}: missing; the checkpoint {tag_dir} must sit in a run directory "
                          "(<run>/checkpoints/step_XXXXXXXX) next to the run's config.yaml")
    return tag_dir, cfg_path


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means a bad file
        raise ExportError(f"{path}: unreadable checkpoint shard ({type(e).__name__}: {e})") from None


def read_checkpoint(tag_dir: Path, tp: int, pp: int) -> dict[tuple[int, int], dict]:
    """{(tp_rank, pp_rank): {"module": state, "ema": shadow or None, "client": {...}}} of a checkpoint.
    Shard files: mp_rank_{tp:02d}_{pp:03d}_model_states.pt (megatron naming) or, with one index,
    mp_rank_{pp * TP + tp:02d}_model_states.pt."""
    files = {}
    for f in sorted(tag_dir.iterdir()):
        m = _SHARD.match(f.name)
        if m:
            a, b = int(m[1]), m[2]
            key = (a, int(b)) if b is not None else (a % tp, a // tp)
            files[key] = f
    if not files and any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        if pp != 1:
            raise ExportError(f"{tag_dir}: ZeRO-3 partitions with PP={pp} (ZeRO-3 runs only at PP=1)")
        return {(t, 0): _read_zero3(tag_dir, t) for t in range(tp)}
    want = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(want - set(files))
    if missing:
        t, p = missing[0]
        name = f"mp_rank_{t:02d}_model_states.pt" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}_model_states.pt"
        raise ExportError(f"{tag_dir / name}: missing (checkpoint layout TP={tp}, PP={pp}; found "
                          f"{sorted(f.name for f in files.values())})")
    shards = {}
    for key in sorted(want):
        state = _torch_load(files[key])
        if "module" not in state:
            raise ExportError(f"{files[key]}: no 'module' entry; not a DeepSpeed model-states file")
        dims = state.get("checkpoint_parallel_dimensions") or {}
        if dims and (dims.get("tp_degree", tp) != tp or dims.get("pp_degree", pp) != pp):
            raise ExportError(f"{files[key]}: written at TP={dims.get('tp_degree')}, PP={dims.get('pp_degree')} "
                              f"but the run config says TP={tp}, PP={pp}")
        module = {k: v for k, v in state["module"].items() if not k.endswith("_extra_state")}
        ema = state.get("ema")
        shards[key] = {"module": module, "ema": ema["shadow"] if ema else None, "file": files[key],
                       "client": {k: state.get(k) for k in ("step", "tokens_seen", "global_steps", "ds_version")}}
    return shards


_ZERO3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


def _read_zero3(tag_dir: Path, tp_rank: int) -> dict:
    """One tensor-parallel shard of a ZeRO-3 checkpoint: every data-parallel rank holds a partition of each
    parameter (fp32 master copy in its optim_states file); DeepSpeed's zero_to_fp32 reassembles them. The
    files are read with `launcher.checkpoint.safe_load` (zero_to_fp32's own reader unpickles anything)."""
    from deepspeed.utils import zero_to_fp32 as z

    from launcher.checkpoint import safe_load

    files: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    for f in tag_dir.iterdir():
        m = _ZERO3.match(f.name)
        if m and int(m[2]) == tp_rank:
            files[m[3]][int(m[1])] = f
    dp = len(files["model"])
    for kind in ("model", "optim"):
        if sorted(files[kind]) != list(range(dp)) or not dp:
            raise ExportError(f"{tag_dir}: ZeRO-3 {kind} states of tensor-parallel rank {tp_rank} are incomplete "
                              f"(data-parallel ranks {sorted(files[kind])} of {dp})")

    def load(path: Path) -> dict:
        try:
            return safe_load(path)
        except RuntimeError as e:
            raise ExportError(str(e)) from None

    models = [load(files["model"][r]) for r in range(dp)]
    optims = [load(files["optim"][r])["optimizer_state_dict"] for r in range(dp)]
    for r, (ms, os_) in enumerate(zip(models, optims)):
        if "param_shapes" not in ms or os_.get("partition_count") not in (dp, [dp]) or "fp32_flat_groups" not in os_:
            raise ExportError(f"{files['model'][r]}: not a ZeRO-3 shard of a {dp}-rank data-parallel checkpoint")
    states = [z.zero_model_state(buffers={k: v for k, v in ms["module"].items() if k in ms["buffer_names"]},
                                 param_shapes=ms["param_shapes"], shared_params=list(ms["shared_params"].items()),
                                 ds_version=ms.get("ds_version"), frozen_param_shapes=ms.get("frozen_param_shapes"),
                                 frozen_param_fragments=ms.get("frozen_param_fragments")) for ms in models]
    full = z._get_fp32_state_dict_from_zero3_checkpoint(dp, [o["fp32_flat_groups"] for o in optims], states,
                                                        exclude_frozen_parameters=False)
    module = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in z.to_torch_tensor(full).items()}
    head = models[0]
    return {"module": module, "ema": None, "file": files["model"][0],
            "client": {k: head.get(k) for k in ("step", "tokens_seen", "global_steps", "ds_version")}}


def read_split_dims(tag_dir: Path, tp: int, pp: int) -> dict[int, dict[str, int | None]]:
    """{pipeline rank: {parameter name: megatron's TP split dimension, None when replicated}}, as training
    recorded it from megatron's own attributes (launcher.checkpoint.SPLIT_FILE); {} at TP = 1 (nothing to join)."""
    from launcher.checkpoint import SPLIT_FILE

    if tp == 1:
        return {}
    path = Path(tag_dir) / SPLIT_FILE
    try:
        doc = json.loads(path.read_text())
        split = {int(p): {str(k): (None if v is None else int(v)) for k, v in dims.items()} for p, dims in doc.items()}
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; a TP={tp} checkpoint records megatron's split dimensions there (it was "
                          "written by an older version of launcher/train.py: resume it once to write a new checkpoint)") from None
    except (ValueError, AttributeError, TypeError) as e:
        raise ExportError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if sorted(split) != list(range(pp)):
        raise ExportError(f"{path}: holds pipeline ranks {sorted(split)}, the run config says PP={pp}")
    return split


def consolidate(parts: dict[tuple[int, int], dict[str, torch.Tensor]], tp: int, pp: int,
                num_layers: int, vpp: int = 1, split: dict[int, dict[str, int | None]] | None = None
                ) -> dict[str, torch.Tensor]:
    """Per-(tp, pp) megatron state dicts (model chunks `chunks.<c>.` under vpp > 1) -> one TP = PP = 1 state
    dict (still vocabulary-padded). split: read_split_dims' table, needed when tp > 1."""
    from launcher.parallelize import global_parameter_name

    full: dict[str, torch.Tensor] = {}
    for p in range(pp):
        names = list(parts[(0, p)])
        for t in range(1, tp):
            if set(parts[(t, p)]) != set(names):
                raise ExportError(f"tensor-parallel ranks 0 and {t} of stage {p} hold different parameters")
        for name in names:
            pieces = [parts[(t, p)][name] for t in range(tp)]
            if tp > 1 and name not in split[p]:
                raise ExportError(f"{name} (pipeline stage {p}) has no recorded tensor-parallel split dimension")
            dim = split[p][name] if tp > 1 else None
            tensor = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
            try:
                gname = global_parameter_name(name, num_layers=num_layers, pipeline_parallel=pp, pp_rank=p,
                                              virtual_pipeline=vpp)
            except ValueError as e:
                raise ExportError(f"pipeline stage {p} (run config: PP={pp}, virtual_pipeline={vpp}): {e}") from None
            if gname in full:
                raise ExportError(f"{gname} is held by more than one pipeline stage or model chunk")
            full[gname] = tensor.detach().cpu().clone()
    return full


def strip_padding(full: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Padded megatron vocab tensors -> V + 1 input rows, V output rows."""
    out = dict(full)
    if "embedding.word_embeddings.weight" in out:
        out["embedding.word_embeddings.weight"] = out["embedding.word_embeddings.weight"][: vocab_size + 1]
    out["output_layer.weight"] = out["output_layer.weight"][:vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def checkpoint_weights(path: str | Path, weights: str | None = None, cfg=None):
    """(cfg, export tensors, meta) of a checkpoint. weights: 'ema', 'raw' or None (EMA if present).
    cfg: the run's config (default: read from the run directory's config.yaml)."""
    from launcher.config import load_config

    tag_dir, cfg_path = resolve_checkpoint(path)
    cfg = cfg if cfg is not None else load_config(cfg_path)
    tp, pp, vpp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline
    shards = read_checkpoint(tag_dir, tp, pp)
    has_ema = all(s["ema"] is not None for s in shards.values())
    if weights is None:
        weights = "ema" if has_ema else "raw"
    if weights == "ema" and not has_ema:
        raise ExportError(f"{next(iter(shards.values()))['file']}: holds no EMA weights (optim.ema_decay was 0); "
                          "use --raw")
    parts = {}
    for key, s in shards.items():
        if weights == "ema":
            missing = sorted(set(s["module"]) - set(s["ema"]))
            if missing:
                raise ExportError(f"{s['file']}: EMA lacks {missing[:3]}")
            parts[key] = {k: s["ema"][k] for k in s["module"]}
        else:
            parts[key] = s["module"]
    tensors = strip_padding(consolidate(parts, tp, pp, cfg.model.num_layers, vpp, read_split_dims(tag_dir, tp, pp)),
                            cfg.model.vocab_size)
    client = shards[(0, 0)]["client"]
    version = (tag_dir.parent.parent / "code_version.txt")
    meta = {"weights": weights, "step": client.get("step"), "tokens_seen": client.get("tokens_seen"),
            "code_version": version.read_text().strip() if version.is_file() else "unknown",
            "source": {"checkpoint": str(tag_dir.resolve()), "tensor_parallel": tp, "pipeline_parallel": pp,
                       "virtual_pipeline": vpp, "zero_stage": cfg.parallel.zero_stage,
                       "deepspeed": client.get("ds_version")}}
    return cfg, tensors, meta


# ---------------------------------------------------------------------------------------------
# Writing and reading an export
# ---------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    from data_pipeline.manifest import file_sha256

    return file_sha256(path)


def _data_facts(cfg) -> dict:
    """Tokenizer facts from the run's data manifest when it is still there (image_shape for pixels)."""
    facts = {"tokenizer": cfg.data.tokenizer}
    try:
        from data_pipeline.manifest import load_manifest

        m = load_manifest(cfg.data.path)
        for key in ("eos_id", "image_shape", "source"):
            if key in m:
                facts[key] = m[key]
    except (ValueError, OSError):
        pass
    return facts


def write_export(out: str | Path, cfg, tensors: dict[str, torch.Tensor], meta: dict, dtype: str = "fp32") -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cast = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    # "pt": safetensors' name for torch tensors, which transformers requires (launcher/hf_export.py)
    save_file(cast, str(tmp), metadata={"format": "pt", "export_format": EXPORT_FORMAT, "weights": meta["weights"],
                                        "dtype": dtype})
    tmp.replace(out / WEIGHTS_FILE)
    m, d = cfg.model, cfg.diffusion
    doc = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
        "architecture": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                         "num_attention_heads": m.num_attention_heads,
                         "ffn_hidden_size": m.ffn_hidden_size or 4 * m.hidden_size,
                         "position_embedding": m.position_embedding, "norm": "layernorm", "activation": "gelu",
                         "rope_base": 10000, "seq_len": m.seq_len, "vocab_size": m.vocab_size,
                         "mask_id": m.vocab_size, "time_conditioning": m.time_conditioning,
                         "image_shape": list(m.image_shape) if m.image_shape else None, "layernorm_eps": 1e-5,
                         "dropout": m.dropout},
        "diffusion": {"kind": d.kind, "schedule": d.schedule, "eps": d.eps,
                      **({"prime_l": d.prime_l} if d.kind == "prime" else {}),
                      **({"genmd4_t1": d.genmd4_t1, "genmd4_w": "genmd4_schedule.raw (w = softplus(raw))"}
                         if d.kind == "genmd4" else {})},
        "data": _data_facts(cfg),
        "weights": meta["weights"], "dtype": dtype, "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
        "code_version": meta.get("code_version"), "source": meta.get("source"),
        "config": cfg.to_dict(),
        "sha256": {WEIGHTS_FILE: _sha256(out / WEIGHTS_FILE)},
    }
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / CONFIG_FILE)
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_export(path: str | Path, verify: bool = True):
    """(cfg, tensors, doc) of an export directory; ExportError naming the file when it is bad."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from launcher.config import ConfigError, config_from_dict

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        doc = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{cfg_file}: unreadable ({e})") from None
    if doc.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{cfg_file}: not an export (format {doc.get('format')!r}, want {EXPORT_FORMAT!r})")
    if not weights_file.is_file():
        raise ExportError(f"{weights_file}: missing")
    want = (doc.get("sha256") or {}).get(WEIGHTS_FILE)
    if verify and want and _sha256(weights_file) != want:
        raise ExportError(f"{weights_file}: sha256 differs from {cfg_file} (torn or replaced)")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights_file}: unreadable ({e})") from None
    try:
        cfg = config_from_dict(doc["config"], str(cfg_file))
    except (ConfigError, KeyError) as e:
        raise ExportError(f"{cfg_file}: bad config ({e})") from None
    return cfg, tensors, doc


def load_weights(path: str | Path, weights: str | None = None):
    """(cfg, tensors, meta) from an export directory or any checkpoint / run directory."""
    if is_export(path):
        cfg, tensors, doc = read_export(path)
        if weights is not None and weights != doc["weights"]:
            raise ExportError(f"{Path(path) / CONFIG_FILE}: the export holds {doc['weights']} weights, "
                              f"{weights} were asked for")
        return cfg, tensors, doc
    return checkpoint_weights(path, weights)


def load_plain(path: str | Path, weights: str | None = None, dtype: torch.dtype = torch.float32):
    """(PlainDenoiser in eval mode, cfg, meta) from an export or checkpoint."""
    from model.plain import PlainDenoiser

    cfg, tensors, meta = load_weights(path, weights)
    model = PlainDenoiser.from_config(cfg.model, cfg.diffusion)
    _load_strict(model, tensors, path)
    return model.to(dtype).eval(), cfg, meta


def _load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source) -> None:
    own = dict(model.named_parameters())
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ExportError(f"{source}: parameters do not match the model config: missing {missing[:4]}, "
                          f"unexpected {extra[:4]}")
    with torch.no_grad():
        for name, p in own.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ExportError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                  f"config wants {tuple(p.shape)}")
            p.copy_(tensors[name])


# ---------------------------------------------------------------------------------------------
# Back into training at any layout (checkpoint.init_from)
# ---------------------------------------------------------------------------------------------

def load_into_megatron(model: torch.nn.Module, export_dir: str | Path, cfg) -> dict:
    """Copy an export into this rank's shard of a megatron denoiser (model/denoiser.py), built at any
    TP/PP/VPP (a stage or a ModelChunks): re-pad the vocabulary, slice tensor-parallel tensors, map each
    parameter to its global name (launcher.parallelize.global_parameter_name: chunk prefix, layer offset). The
    export's architecture and diffusion kind must equal the run's. Returns the export's config.json."""
    from megatron.core import parallel_state as ps

    from launcher.parallelize import current_layout, global_parameter_name

    exp_cfg, tensors, doc = read_export(export_dir)
    where = Path(export_dir) / CONFIG_FILE
    a, b = exp_cfg, cfg
    for key, x, y in (("model.num_layers", a.model.num_layers, b.model.num_layers),
                      ("model.hidden_size", a.model.hidden_size, b.model.hidden_size),
                      ("model.num_attention_heads", a.model.num_attention_heads, b.model.num_attention_heads),
                      ("model.ffn_hidden_size", a.model.ffn_hidden_size or 4 * a.model.hidden_size,
                       b.model.ffn_hidden_size or 4 * b.model.hidden_size),
                      ("model.vocab_size", a.model.vocab_size, b.model.vocab_size),
                      ("model.position_embedding", a.model.position_embedding, b.model.position_embedding),
                      ("model.time_conditioning", a.model.time_conditioning, b.model.time_conditioning),
                      ("diffusion.kind", a.diffusion.kind, b.diffusion.kind),
                      ("diffusion.prime_l", a.diffusion.prime_l if a.diffusion.kind == "prime" else None,
                       b.diffusion.prime_l if b.diffusion.kind == "prime" else None)):
        if x != y:
            raise ExportError(f"{where}: {key} = {x!r} in the export, {y!r} in this run; "
                              "init_from needs the same architecture and diffusion kind")
    tp_rank = ps.get_tensor_model_parallel_rank()
    layout = current_layout()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = global_parameter_name(name, num_layers=cfg.model.num_layers, **layout)
            if gname not in tensors:
                raise ExportError(f"{Path(export_dir) / WEIGHTS_FILE}: lacks {gname}")
            src = tensors[gname].to(p.dtype)
            if getattr(p, "tensor_model_parallel", False):
                dim, local = p.partition_dim, p.shape[p.partition_dim]
                full_len = local * ps.get_tensor_model_parallel_world_size()
                if src.shape[dim] > full_len:
                    raise ExportError(f"{Path(export_dir) / WEIGHTS_FILE}: {gname} is larger than the model's")
                if src.shape[dim] < full_len:      # vocabulary padding: zero rows past V (+ 1)
                    pad = list(src.shape)
                    pad[dim] = full_len - src.shape[dim]
                    src = torch.cat([src, src.new_zeros(pad)], dim=dim)
                src = src.narrow(dim, tp_rank * local, local)
            if tuple(src.shape) != tuple(p.shape):
                raise ExportError(f"{Path(export_dir) / WEIGHTS_FILE}: {gname} has shape {tuple(src.shape)}, "
                                  f"this rank's parameter {tuple(p.shape)}")
            p.copy_(src)
    return doc


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder or a step_XXXXXXXX folder "
                                      "(or, with --hf and no --out, an export to add the transformers files to)")
    p.add_argument("--out", help="export directory (model.safetensors + config.json)")
    p.add_argument("--hf", action="store_true",
                   help="also write what transformers loads: AutoModelForMaskedLM (trust_remote_code) and "
                        "AutoTokenizer (needs the eval extra)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--raw", action="store_true", help="the trained weights, not their EMA")
    which.add_argument("--ema", action="store_true", help="the EMA weights (default when the checkpoint has them)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args(argv)
    if a.out is None:
        if not (a.hf and is_export(a.checkpoint)):
            p.error("--out is required (without it: an export directory and --hf, to add the transformers files)")
        if a.raw or a.ema or a.dtype != "fp32":
            p.error(f"{a.checkpoint} is an export: --raw, --ema and --dtype apply when exporting a checkpoint")
    try:
        if a.out is None:
            from launcher.hf_export import write_hf

            write_hf(a.checkpoint)
            print(json.dumps({"export": str(a.checkpoint), "hf": True}))
            return 0
        cfg, tensors, meta = checkpoint_weights(a.checkpoint, "raw" if a.raw else "ema" if a.ema else None)
        out = write_export(a.out, cfg, tensors, meta, a.dtype)
        if a.hf:
            from launcher.hf_export import write_hf

            write_hf(out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in tensors.values())
    print(json.dumps({"export": str(out), "weights": meta["weights"], "dtype": a.dtype, "step": meta["step"],
                      "parameters": n, "hf": a.hf, "source": meta["source"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
