"""TrainConfig: TOML in/out, key-path errors, suggestions, defaults, form registry."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, TrainConfig
from engine.config_fields import config_fields
from engine.models import ModelNotFoundError, resolve_model

MAIN = """
output_dir = "out"
dataset = "dataset.toml"
epochs = 3
[model]
type = "wan"
ckpt_path = "demo"
[adapter]
type = "lora"
rank = 8
[optimizer]
type = "adamw"
lr = 1e-4
"""

DATASET = """
resolutions = [256]
frame_buckets = [1, 17]
[[directory]]
path = "media"
num_repeats = 2
"""


def write_pair(tmp_path: Path) -> Path:
    (tmp_path / "dataset.toml").write_text(DATASET)
    (tmp_path / "media").mkdir()
    main = tmp_path / "train.toml"
    main.write_text(MAIN)
    return main


def test_main_plus_dataset_file_resolves_relative_to_dataset_file(tmp_path: Path) -> None:
    cfg = TrainConfig.from_toml_file(write_pair(tmp_path)).validate()
    assert cfg.epochs == 3 and cfg.adapter.rank == 8 and cfg.optimizer.lr == 1e-4
    assert cfg.dataset.resolutions == [256]
    assert cfg.dataset.directory[0].path == str((tmp_path / "media").resolve())
    assert cfg.dataset.directory[0].num_repeats == 2


def test_round_trip_inlines_dataset(tmp_path: Path) -> None:
    cfg = TrainConfig.from_toml_file(write_pair(tmp_path))
    text = cfg.to_toml()
    assert "[dataset]" in text and "[[dataset.directory]]" in text
    again = TrainConfig.from_toml_string(text)
    assert again == cfg


def test_save_every_defaults_to_one_epoch() -> None:
    cfg = TrainConfig(output_dir="o")
    assert cfg.effective_save_every_n_epochs == 1
    assert TrainConfig(output_dir="o", save_every_n_steps=5).effective_save_every_n_epochs is None
    assert cfg.lora_alpha == cfg.adapter.rank


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_toml_string('output_dir="o"\n[optimizer]\nlearning_rat = 1e-4\nlr=1\n')
    assert "optimizer.learning_rat" in str(err.value)
    with pytest.raises(ConfigError, match=r"did you mean 'gradient_clipping'"):
        TrainConfig.from_toml_string('output_dir="o"\ngradient_cliping = 1.0\n')


@pytest.mark.parametrize(
    "toml, path",
    [
        ('output_dir="o"\n[optimizer]\nlr = 0\n', "optimizer.lr"),
        ('output_dir="o"\n[optimizer]\nlr = "fast"\n', "optimizer.lr"),
        ('output_dir="o"\nepochs = 0\n', "epochs"),
        ('output_dir="o"\nlr_scheduler = "cosin"\n', "lr_scheduler"),
        ('output_dir="o"\n[dataset]\nframe_buckets = [1, 32]\n', "dataset.frame_buckets[1]"),
        ('output_dir="o"\n[dataset]\nresolutions = [250]\n', "dataset.resolutions[0]"),
        ('output_dir="o"\nzero_stage = 3\n', "zero_stage"),
        ('output_dir="o"\n[model]\nmin_t = 0.9\nmax_t = 0.1\n', "model.min_t"),
        ('output_dir="o"\n[adapter]\nrank = 0\n', "adapter.rank"),
        ('output_dir="o"\ncaption_dropout_rate = 1.0\n', "caption_dropout_rate"),
        ('epochs = 1\n', "output_dir"),
    ],
)
def test_bad_values_name_the_key_path(toml: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_toml_string(toml + '[[dataset.directory]]\npath="d"\n' if "[dataset]" in toml else toml +
                                     '\n[dataset]\n[[dataset.directory]]\npath="d"\n').validate()
    assert path in err.value.paths, str(err.value)
    assert str(err.value).startswith(path) or f"; {path}" in str(err.value)


DIFFUSION_PIPE = Path(__file__).resolve().parent / "fixtures" / "diffusion_pipe"


def warned_paths(cfg: TrainConfig) -> list[str]:
    return [w.split(":")[0] for w in cfg.warnings]


def test_diffusion_pipe_wan_example_validates_with_one_warning_per_unimplemented_key() -> None:
    cfg = TrainConfig.from_toml_file(DIFFUSION_PIPE / "wan_min_vram.toml").validate()
    paths = warned_paths(cfg)
    assert sorted(paths) == sorted(set(paths)), "one warning per key"
    assert set(paths) == {"partition_method", "steps_per_print",
                          "optimizer.stabilize", "optimizer.type", "monitoring",
                          "dataset.cache_shuffle_num", "dataset.directory[1].mask_path"}
    assert cfg.blocks_to_swap == 32 and cfg.model.transformer_dtype == "float8"  # implemented (issue 18)
    # implemented: eval sets, the moved clip mode, [w, h] pairs, per-directory overrides, 'unsloth' -> offload
    assert cfg.eval_datasets[0].name == "held_out" and cfg.eval_before_first_step and cfg.eval_every_n_epochs == 1
    assert cfg.eval_datasets[0].dataset.directory[0].path == str((DIFFUSION_PIPE / "eval").resolve())
    assert cfg.dataset.video_clip_mode == "single_beginning" and cfg.activation_checkpointing is True
    assert cfg.performance.checkpointing == "offload"  # 'unsloth': the block inputs in host memory (issue 18)
    assert cfg.dataset.resolutions == [64]
    stills = cfg.dataset.directory[1]
    assert stills.ar_buckets == [1.0, 80 / 48] and stills.frame_buckets == [1] and stills.num_repeats == 2
    again = TrainConfig.from_toml_string(cfg.to_toml())  # what the studio queues: no foreign key left
    assert again.to_dict() == cfg.to_dict()
    assert again.warnings == [w for w in cfg.warnings if w.startswith("optimizer.type")]


def test_diffusion_pipe_main_example_maps_what_it_can() -> None:
    cfg = TrainConfig.from_toml_file(DIFFUSION_PIPE / "main_example_wan.toml").validate()
    paths = warned_paths(cfg)
    assert sorted(paths) == sorted(set(paths))
    for key in ("micro_batch_size_per_gpu", "image_micro_batch_size_per_gpu", "pseudo_huber_c", "map_num_proc",
                "eval_every_n_examples", "save_every_n_examples", "x_axis_examples", "partition_split",
                "model.llm_path", "adapter.fuse_adapters", "disable_block_swap_for_eval"):
        assert key in paths, key
    assert cfg.micro_batch_size_per_gpu == 1  # the smallest of the per-resolution sizes
    assert cfg.performance.compile_blocks and cfg.lr_scheduler == "constant" and cfg.optimizer.lr == 1e-5
    assert cfg.model.transformer_path == "transformer" and cfg.dataset.video_clip_mode == "single_middle"
    assert cfg.eval_every_n_steps == 100 and cfg.model.max_t == 0.875
    assert cfg.blocks_to_swap == 20 and cfg.model.transformer_dtype == "float8"


def test_unknown_optimizer_and_foreign_value_shapes_still_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^optimizer.type: 'Lion2' is not a known optimizer"):
        TrainConfig.from_toml_string('output_dir="o"\n[optimizer]\ntype="Lion2"\n'
                                     '[dataset]\n[[dataset.directory]]\npath="d"\n').validate()
    with pytest.raises(ConfigError, match="model.transformer_dtype: 'fp8' is not one of"):
        TrainConfig.from_toml_string('output_dir="o"\n[model]\ntransformer_dtype="fp8"\n')


def test_config_check_cli_exits_0_with_warnings_and_2_on_errors(tmp_path: Path, capsys) -> None:
    from studio.cli import main

    assert main(["--home", str(tmp_path), "config", "check", str(DIFFUSION_PIPE / "wan_min_vram.toml")]) == 0
    out = capsys.readouterr().out
    assert "partition_method: ignored" in out and "warning" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('output_dir="o"\n[optimizer]\nlr=0\n')
    assert main(["--home", str(tmp_path), "config", "check", str(bad)]) == 2
    assert "optimizer.lr: must be > 0" in capsys.readouterr().err


def test_validate_collects_every_error() -> None:
    cfg = TrainConfig(output_dir="o").with_value("epochs", 0).with_value("optimizer.lr", -1.0)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert {"epochs", "optimizer.lr", "dataset.directory"} <= set(err.value.paths)


def test_invalid_toml_and_missing_dataset_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        TrainConfig.from_toml_string("output_dir = ")
    main = tmp_path / "m.toml"
    main.write_text('output_dir="o"\ndataset="nope.toml"\n')
    with pytest.raises(ConfigError, match="dataset file not found"):
        TrainConfig.from_toml_file(main)


def test_field_registry_and_key_path_access() -> None:
    fields = {f.path: f for f in config_fields()}
    assert fields["optimizer.lr"].type == "float" and fields["optimizer.lr"].default == 2e-5
    assert fields["lr_scheduler"].choices == ("constant", "linear", "cosine")
    assert fields["model.timestep_sample_method"].choices == ("logit_normal", "uniform")
    assert fields["dataset.frame_buckets"].type == "list[int]"
    assert fields["max_steps"].optional
    assert all(f.help for f in fields.values())
    cfg = TrainConfig(output_dir="o")
    for path in fields:
        assert cfg.get(path) == fields[path].default or path == "output_dir"
    cfg2 = cfg.with_value("adapter.rank", 4.0).with_value("dataset.directory", [{"path": "x", "num_repeats": 3}])
    assert cfg2.get("adapter.rank") == 4 and isinstance(cfg2.get("adapter.rank"), int)
    assert cfg2.dataset.directory[0].num_repeats == 3 and cfg.adapter.rank == 32
    with pytest.raises(ConfigError, match="adapter.rnk"):
        cfg.with_value("adapter.rnk", 3)
    with pytest.raises(ConfigError, match="expected an integer"):
        cfg.with_value("epochs", "many")


def test_cache_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDIO_HOME", raising=False)
    cfg = TrainConfig(output_dir=str(tmp_path / "runs" / "x"))
    assert cfg.resolved_cache_dir() == tmp_path / "runs" / "cache"
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert cfg.resolved_cache_dir() == tmp_path / "home" / "cache" / "latents"
    assert cfg.with_value("cache_dir", "/c").resolved_cache_dir() == Path("/c")


def test_resolve_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither 'demo' nor"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_example_configs_parse() -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    mains = [p for p in root.glob("*.toml") if "dataset" not in p.name]
    assert mains
    for path in mains:
        TrainConfig.from_toml_file(path)


# ---- pinned to the output of the hand-rolled (pre-pydantic) config --------------------------------
# tests/fixtures/config/before_pydantic.json was written by the dataclass version: the form registry,
# the outcome and message of each TOML input, and rendered TOML (key order included).
BEFORE = Path(__file__).resolve().parent / "fixtures" / "config" / "before_pydantic.json"


def _pinned() -> dict:
    import json

    return json.loads(BEFORE.read_text())


def test_form_registry_is_unchanged() -> None:
    now = [[f.path, f.type, repr(f.default), repr(f.choices), f.help, f.optional] for f in config_fields()]
    assert now == _pinned()["fields"]


@pytest.mark.parametrize("name", sorted(_pinned()["toml"]))
def test_parse_and_validate_messages_are_unchanged(name: str) -> None:
    case = _pinned()["toml"][name]
    try:
        cfg = TrainConfig.from_toml_string(case["toml"])
    except ConfigError as exc:
        assert (case["stage"], str(exc)) == ("parse", case["message"])
        return
    try:
        cfg.validate()
    except ConfigError as exc:
        assert (case["stage"], str(exc)) == ("validate", case["message"])
        return
    assert case["stage"] == "ok"
    if name in _pinned()["rendered"]:
        assert cfg.to_toml() == _pinned()["rendered"][name]


def test_rendered_defaults_are_unchanged() -> None:
    assert TrainConfig(output_dir="o").to_toml() == _pinned()["rendered"]["default"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("adapter.alpha", 2.5, "adapter.alpha: expected an integer, got 2.5"),
        ("adapter.rnk", 1, "adapter.rnk: no such key (did you mean 'rank'?)"),
        ("dataset.directory", [{"path": "x", "bad": 3}], "dataset.directory[0].bad: unknown key"),
        ("epochs.x", 3, "epochs: is not a table"),
        ("lr_scheduler", "cosin", "lr_scheduler: 'cosin' is not one of 'constant', 'linear', 'cosine' "
                                  "(did you mean 'cosine'?)"),
        ("model", 3, "model: expected a table"),
        ("optimizer.lr", None, "optimizer.lr: must not be empty"),
        ("performance.compile_blocks", "yes", "performance.compile_blocks: expected true or false, got 'yes'"),
        ("zzz", 1, "zzz: no such key"),
    ],
)
def test_with_value_messages(path: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(output_dir="o").with_value(path, value)
    assert str(err.value) == message


def test_assignment_and_direct_construction_are_checked_with_the_key_path() -> None:
    from engine.config import DatasetConfig, DirectoryConfig, PerformanceConfig

    cfg = TrainConfig(output_dir="o")
    cfg.cache_dir = "/c"
    cfg.dataset.directory = [DirectoryConfig(path="d", num_repeats=2)]
    cfg.dataset.directory = {"path": "e"}  # one [dataset.directory] table is a list of one
    assert cfg.resolved_cache_dir() == Path("/c") and cfg.dataset.directory[0].path == "e"
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: expected a number, got 'x'$"):
        cfg.optimizer.lr = "x"
    with pytest.raises(ConfigError, match=r"^dataset\.frame_buckets\[1\]: expected an integer, got 2\.5$"):
        DatasetConfig(frame_buckets=[1, 2.5])
    with pytest.raises(ConfigError, match=r"^performance\.checkpointing: 'most' is not one of"):
        PerformanceConfig(checkpointing="most")
    # with_value leaves the original alone
    changed = cfg.with_value("optimizer.lr", 1)
    assert changed.optimizer.lr == 1.0 and isinstance(changed.optimizer.lr, float) and cfg.optimizer.lr == 2e-5
