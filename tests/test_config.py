"""Config schema: unknown keys, bad types and impossible layouts are errors naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.config import ConfigError, apply_overrides, config_from_dict, load_config, validate_world

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.seq_len >= 1


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 1e-3, "learning_rate": 2}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(write(tmp_path, {"optimizer": {}}))


@pytest.mark.parametrize("key,value,msg", [
    ("model.num_layers", "four", "must be an int"),
    ("model.num_layers", 2.5, "must be an int"),
    ("optim.lr", "fast", "must be a float"),
    ("data.shuffle", 1, "must be a bool"),
    ("diffusion.schedule", "sigmoid", "is not one of"),
    ("parallel.precision", "fp8", "is not one of"),
])
def test_bad_types_name_the_key(tmp_path, key, value, msg):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {section: {name: value}}))
    assert key in str(e.value) and msg in str(e.value)


def test_int_is_accepted_for_float():
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


def test_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 1e-3}})
    cfg = load_config(p, ["optim.lr=2e-4", "model.num_layers=6", "data.shuffle=false", "run.name=abc"])
    assert cfg.optim.lr == 2e-4 and cfg.model.num_layers == 6 and cfg.data.shuffle is False
    assert cfg.run.name == "abc"


def test_bad_override_names_the_key(tmp_path):
    p = write(tmp_path, {})
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


@pytest.mark.parametrize("data,key", [
    ({"model": {"hidden_size": 100, "num_attention_heads": 3}}, "model.hidden_size"),
    ({"optim": {"global_batch_size": 0}}, "optim.global_batch_size"),   # micro_batch_size is a maximum: 3 and 8 resolve
    ({"parallel": {"tensor_parallel": 3}, "model": {"num_attention_heads": 4}}, "parallel.tensor_parallel"),
    ({"parallel": {"zero_stage": 5}}, "parallel.zero_stage"),
    ({"parallel": {"zero_stage": 0}}, "parallel.zero_stage"),
    ({"parallel": {"zero_stage": 3}, "optim": {"ema_decay": 0.999}}, "optim.ema_decay"),
    ({"parallel": {"zero_stage": 3}, "diffusion": {"kind": "genmd4"}}, "diffusion.kind"),
    ({"parallel": {"zero_stage": 3, "pipeline_parallel": 2}, "model": {"num_layers": 4}}, "parallel.zero_stage"),
    ({"parallel": {"pipeline_parallel": 2}, "model": {"num_layers": 3}}, "parallel.pipeline_parallel"),
    ({"parallel": {"pipeline_parallel": 2, "zero_stage": 2}, "model": {"num_layers": 4}}, "parallel.zero_stage"),
    ({"diffusion": {"kind": "genmd4"}, "parallel": {"pipeline_parallel": 2}}, "diffusion.kind"),
    ({"parallel": {"virtual_pipeline": 0}}, "parallel.virtual_pipeline"),
    ({"parallel": {"virtual_pipeline": 2}, "model": {"num_layers": 4}}, "parallel.virtual_pipeline"),
    ({"parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2}, "model": {"num_layers": 6}},
     "parallel.virtual_pipeline"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel"),   # TP = 1
    ({"parallel": {"sequence_parallel": True, "tensor_parallel": 4}, "model": {"num_attention_heads": 4, "seq_len": 30}},
     "parallel.sequence_parallel"),
    ({"optim": {"ema_decay": 1.0}}, "optim.ema_decay"),
    ({"diffusion": {"eps": 0.7}}, "diffusion.eps"),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
])
def test_semantic_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert key in str(e.value)


def test_world_size_must_fit_the_layout():
    cfg = config_from_dict({"parallel": {"tensor_parallel": 2}, "model": {"num_attention_heads": 4},
                            "optim": {"micro_batch_size": 4, "global_batch_size": 8}})
    validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="not divisible by tensor_parallel"):
        validate_world(cfg, 3)
    with pytest.raises(ConfigError, match=r"optim.global_batch_size: 8 sequences do not split over 3 data-parallel "
                                          r"ranks .*it splits at 2, 4, 8, 16 processes"):
        validate_world(cfg, 6, unit="processes")   # dp=3


@pytest.mark.parametrize("world,micro,global_batch,want", [
    (1, 8, 32, (1, 8, 4)),      # micro-batch 8, 4 accumulation steps
    (4, 8, 32, (4, 8, 1)),
    (8, 8, 32, (8, 4, 1)),      # the share of 4 per rank caps the micro-batch
    (2, 8, 12, (2, 6, 1)),
    (2, 4, 12, (2, 3, 2)),      # the largest divisor of the share 6 that is <= 4
    (1, 5, 7, (1, 1, 7)),       # a prime share: micro-batches of 1
])
def test_the_global_batch_is_the_contract_and_the_micro_batch_a_maximum(world, micro, global_batch, want):
    cfg = config_from_dict({"optim": {"micro_batch_size": micro, "global_batch_size": global_batch}})
    b = validate_world(cfg, world)
    assert (b.data_parallel, b.micro_batch_size, b.grad_accum) == want
    assert b.micro_batch_size * b.grad_accum * b.data_parallel == global_batch
    assert "global batch" in b.describe()


def test_a_global_batch_that_cannot_split_names_the_node_counts_that_work():
    cfg = config_from_dict({"optim": {"micro_batch_size": 16, "global_batch_size": 48}})
    with pytest.raises(ConfigError) as e:
        validate_world(cfg, 5 * 8, "c.yaml", tasks_per_unit=8)
    msg = str(e.value)
    assert msg.startswith("c.yaml: optim.global_batch_size: 48 sequences do not split over 40 data-parallel ranks")
    assert "it splits at 1, 2, 3, 6 nodes of 8 tasks each" in msg


def test_virtual_pipeline_layout_is_checked_with_the_values():
    with pytest.raises(ConfigError, match=r"parallel.virtual_pipeline: 2 needs parallel.pipeline_parallel > 1"):
        config_from_dict({"parallel": {"virtual_pipeline": 2}, "model": {"num_layers": 4}})
    with pytest.raises(ConfigError, match=r"model.num_layers=6 is not divisible by pipeline_parallel x "
                                          r"virtual_pipeline = 2 x 2"):
        config_from_dict({"parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2}, "model": {"num_layers": 6}})
    cfg = config_from_dict({"parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2}, "model": {"num_layers": 8}})
    assert cfg.parallel.virtual_pipeline == 2 and config_from_dict({}).parallel.virtual_pipeline == 1


@pytest.mark.parametrize("world,micro,global_batch,want", [
    (2, 4, 8, (4, 2)),      # PP=2, DP=1: 2 micro-batches per step
    (2, 4, 16, (4, 4)),
    (2, 4, 4, (2, 2)),      # 1 micro-batch of 4 < PP (megatron's interleaved schedule raises): 2 of 2
    (2, 4, 12, (3, 4)),     # 3 of 4 would leave a last group of 1 < PP (RuntimeError in megatron): 4 of 3
    (4, 4, 16, (4, 2)),     # DP=2: 2 per data-parallel rank
    (4, 4, 8, (2, 2)),      # DP=2: a share of 4 per rank, 2 micro-batches of 2
    (4, 4, 2, None),        # a share of 1 per rank cannot make 2 micro-batches
])
def test_virtual_pipeline_needs_micro_batches_in_multiples_of_the_pipeline_size(world, micro, global_batch, want):
    cfg = config_from_dict({"parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2}, "model": {"num_layers": 4},
                            "optim": {"micro_batch_size": micro, "global_batch_size": global_batch}})
    if want is not None:
        b = validate_world(cfg, world)
        assert (b.micro_batch_size, b.grad_accum) == want and b.grad_accum % 2 == 0
        return
    with pytest.raises(ConfigError) as e:
        validate_world(cfg, world)
    assert "cannot be cut into a multiple of parallel.pipeline_parallel=2 micro-batches" in str(e.value)
    cfg.parallel.virtual_pipeline = 1      # the 1F1B schedule takes any number of micro-batches
    assert validate_world(cfg, world).micro_batch_size == 1


def test_submit_rejects_bad_config_before_launching(tmp_path):
    p = write(tmp_path, {"model": {"num_layerz": 2}})
    out = subprocess.run([sys.executable, str(REPO / "launcher" / "submit.py"), "--local", "2", str(p)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "model.num_layerz" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_image_shape_is_a_list_of_ints_matching_seq_len(tmp_path):
    p = write(tmp_path, {"model": {"seq_len": 48, "vocab_size": 256}})
    cfg = load_config(p, ["model.image_shape=[4, 4, 3]"])
    assert cfg.model.image_shape == [4, 4, 3]
    with pytest.raises(ConfigError, match=r"model.image_shape\[1\]"):
        load_config(p, ["model.image_shape=[4, x, 3]"])
    with pytest.raises(ConfigError, match="model.image_shape.*seq_len=48"):
        load_config(p, ["model.image_shape=[4, 4, 1]"])


def test_wandb_and_profile_steps_are_typed_keys_off_by_default(tmp_path):
    cfg = config_from_dict({})
    assert cfg.logging.wandb.mode == "disabled" and cfg.logging.profile_steps == []
    p = write(tmp_path, {"logging": {"wandb": {"project": "mdiff", "mode": "offline", "tags": ["a", "b"]},
                                     "profile_steps": [2, 3]}})
    cfg = load_config(p, ["logging.wandb.name=x"])
    assert (cfg.logging.wandb.project, cfg.logging.wandb.mode, cfg.logging.wandb.tags) == ("mdiff", "offline", ["a", "b"])
    assert cfg.logging.wandb.name == "x" and cfg.logging.profile_steps == [2, 3]


@pytest.mark.parametrize("logging,key,msg", [
    ({"wandb": {"project": "p", "mode": "on"}}, "logging.wandb.mode", "is not one of ['disabled', 'online', 'offline']"),
    ({"wandb": {"project": "p", "entitty": "me"}}, "logging.wandb.entitty", "unknown key"),
    ({"wandb": {"project": 3}}, "logging.wandb.project", "must be a string"),
    ({"wandb": "offline"}, "logging.wandb", "must be a mapping"),
    ({"wandb": {"mode": "offline"}}, "logging.wandb.project", "must be set when logging.wandb.mode is 'offline'"),
    ({"profile_steps": [3]}, "logging.profile_steps", "[first, last]"),
    ({"profile_steps": [3, 2]}, "logging.profile_steps", "1 <= first <= last"),
    ({"profile_steps": [0, 2]}, "logging.profile_steps", "got [0, 2]"),
    ({"profile_steps": ["a", 2]}, "logging.profile_steps[0]", "must be an int"),
    ({"profile_steps": 5}, "logging.profile_steps", "must be a list"),
])
def test_bad_wandb_and_profile_settings_name_the_key(tmp_path, logging, key, msg):
    p = write(tmp_path, {"logging": logging})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and msg in str(e.value) and str(p) in str(e.value)
