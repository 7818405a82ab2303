"""Config tree: shipped configs load, overrides win, bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from livetrain.config import Config, ConfigError, field_docs, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_unknown_key_fails_naming_it(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        load_config(p)


def test_unknown_top_level_key_fails_naming_it():
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(overrides=["trian.lr=1"])


def test_overrides_beat_file_and_file_beats_defaults(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  batch_size: 64\n")
    cfg = load_config(p, ["train.lr=0.01"])
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 64
    assert cfg.train.steps_per_round == Config().train.steps_per_round


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(overrides=["train.batch_size=big"])


def test_cross_field_check_names_the_field():
    with pytest.raises(ConfigError, match="buffer.window_rows"):
        load_config(overrides=["buffer.capacity_rows=10", "buffer.window_rows=20"])


def test_schema_needs_exactly_one_feature_source():
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(overrides=["schema.features=[a, b]", "schema.feature_list_column=f"])
    cfg = load_config(overrides=["schema.feature_list_column=f", "schema.num_features=4"])
    assert cfg.schema.num_features == 4


def test_drift_points_are_built_as_dataclasses():
    cfg = load_config(overrides=["synthetic.drifts=[{at_row: 10, variant: 2}]"])
    assert cfg.synthetic.drifts[0].variant == 2 and cfg.synthetic.drifts[0].width == 1


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_every_field_is_documented():
    undocumented = [key for key, _, doc in field_docs() if not doc]
    assert undocumented == []


def test_readme_config_reference_is_what_help_fields_prints():
    from livetrain.cli import _fields_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("\n**(top level)**", readme.index("## Config reference"))
    end = readme.find("\n## ", start)
    # regenerate: livetrain config --help-fields --markdown
    assert readme[start : end if end != -1 else None].rstrip("\n") == _fields_markdown()


@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_a_duration_that_is_not_positive_is_refused(seconds):
    with pytest.raises(ConfigError, match="duration_s: must be > 0"):
        load_config(overrides=[f"duration_s={seconds}"])


def test_broken_yaml_is_a_config_error_naming_the_file_or_the_override(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {batch_size: 5\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"override 'schema.features=\[a, b': the value is not valid YAML"):
        load_config(overrides=["schema.features=[a, b"])


def test_a_feature_named_twice_or_also_the_label_is_refused():
    with pytest.raises(ConfigError, match="'a' named more than once"):
        load_config(overrides=["schema.features=[a, b, a]"])
    with pytest.raises(ConfigError, match="schema.label: 'y' is also a feature"):
        load_config(overrides=["schema.features=[a, y]", "schema.label=y"])


@pytest.mark.parametrize("override", ["train.lr=.nan", "gate.tolerance=.inf", "drift.psi_threshold=-.inf"])
def test_a_number_that_is_not_finite_is_refused(override):
    with pytest.raises(ConfigError, match=r"expected a finite number"):
        load_config(overrides=[override])


def test_a_hidden_layer_without_units_is_refused():
    with pytest.raises(ConfigError, match=r"model.hidden: every width must be >= 1, got \[32, 0\]"):
        load_config(overrides=["model.hidden=[32, 0]"])


@pytest.mark.parametrize("rows", ["0", "-1"])
def test_a_prequential_window_without_rows_is_refused(rows):
    with pytest.raises(ConfigError, match="gate.window_rows: must be >= 1"):
        load_config(overrides=[f"gate.window_rows={rows}"])


def test_a_live_window_too_short_for_the_automatic_rollback_is_refused():
    with pytest.raises(ConfigError, match=r"gate.window_rows \(1999\) must be >= gate.rollback_min_rows \(2000\)"):
        load_config(overrides=["gate.window_rows=1999"])
    assert load_config(overrides=["gate.window_rows=1000", "gate.rollback_min_rows=1000"]).gate.window_rows == 1000


@pytest.mark.parametrize(
    "override, key",
    [
        ("synthetic.noise=1.5", "synthetic.noise"),
        ("synthetic.variant=9", "synthetic.variant"),
        ("synthetic.max_rows=-1", "synthetic.max_rows"),
        ("synthetic.seed=-1", "synthetic.seed"),
        ("synthetic.drifts=[{at_row: 5, variant: 1, width: 0}]", r"synthetic.drifts\[0\].width"),
        ("synthetic.drifts=[{at_row: -5, variant: 1}]", r"synthetic.drifts\[0\].at_row"),
        ("synthetic.drifts=[{at_row: 5, variant: 4}]", r"synthetic.drifts\[0\].variant"),
    ],
)
def test_a_synthetic_stream_that_cannot_be_written_is_refused_when_loaded(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_a_hyperplane_without_features_is_refused_when_loaded():
    with pytest.raises(ConfigError, match="synthetic.num_features: must be >= 1"):
        load_config(overrides=["synthetic.generator=hyperplane", "synthetic.num_features=0"])


def test_a_float_in_scientific_notation_is_a_number(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n")
    assert load_config(p).train.lr == 1e-3
    assert load_config(overrides=["train.lr=1e-4", "duration_s=1e-05"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(overrides=["train.lr=nan"])


@pytest.mark.parametrize("state_dir", ["2024", "x #1", "[a]", "~x: y"])
def test_command_line_flags_are_taken_as_typed_not_as_yaml(tmp_path: Path, state_dir: str):
    from livetrain.cli import _parser, _resolve

    p = tmp_path / "c.yaml"
    p.write_text("source:\n  kind: directory\n")
    args = _parser().parse_args(["run", "--config", str(p), "--state-dir", state_dir, "--duration", "0.00001"])
    cfg = _resolve(args)
    assert cfg.state_dir == state_dir and cfg.duration_s == 1e-05


def test_a_buffer_too_small_to_start_training_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"train.min_buffer_rows: 5000 is more than buffer.capacity_rows \(4000\)"):
        load_config(overrides=["train.min_buffer_rows=5000", "buffer.capacity_rows=4000", "buffer.window_rows=100"])


def test_a_buffer_that_holds_exactly_min_buffer_rows_is_accepted():
    cfg = load_config(overrides=["train.min_buffer_rows=4000", "buffer.capacity_rows=4000", "buffer.window_rows=100"])
    assert cfg.train.min_buffer_rows == cfg.buffer.capacity_rows == 4000


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.cpus_per_worker=0", "train.cpus_per_worker: must be > 0"),
        ("train.worker_resources={trainer: lots}", "train.worker_resources.trainer: expected a number"),
        ("train.worker_resources={trainer: -1}", "train.worker_resources.trainer: must be >= 0"),
        ("train.worker_resources={GPU: 1}", "train.worker_resources.GPU: set CPUs with train.cpus_per_worker"),
        ("train.max_failures=-2", "train.max_failures: must be >= -1"),
        ("ray.num_cpus=0", "ray.num_cpus: must be >= 1"),
        ("serve.port=0", "serve.port: must be a TCP port"),
        ("serve.port=65536", "serve.port: must be a TCP port"),
        ("serve.host=''", "serve.host: empty"),
        ("state_dir=' '", "state_dir: empty"),
        ("schema.features=[a, '']", "schema.features: a column name is empty"),
        ("ray.namespace=''", "ray.namespace: empty"),
        ("gate.tolerance=1.5", r"gate.tolerance: must be in \[0, 1\]"),
        ("gate.tolerance=-0.1", r"gate.tolerance: must be in \[0, 1\]"),
        ("gate.alarm_min_z=0", "gate.alarm_min_z: must be > 0"),
        ("gate.keep_versions=5", r"gate.keep_versions: 5 keeps too few; .*gate.compare_versions \(4\).* need 6 \(0 keeps all\)"),
        ("gate.keep_versions=-1", r"gate.keep_versions: must be >= 0 \(0 keeps all\)"),
        ("schema={infer: true, classes: [0, 0, 1]}", "schema.classes: need at least two distinct labels"),
        ("buffer={backpressure: coverage, max_unseen_rows: 200001}", r"buffer.max_unseen_rows: must be in \[1, buffer.capacity_rows\]"),
        ("gate.min_eval_rows=5001", r"gate.min_eval_rows: must be in \[1, gate.max_eval_rows\]"),
        ("gate.holdout_fraction=1.0", r"gate.holdout_fraction: must be in \[0, 1\)"),
        ("train.lr=true", "train.lr: expected a number, got True"),
        ("train.batch_size=true", "train.batch_size: expected an integer, got True"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_tilde_in_a_local_path_is_the_home_directory(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config(overrides=["state_dir=~/lt", "source.path=~/landing", "storage.uri=~/shared/lt"])
    home = "/home/someone"
    assert (cfg.state_dir, cfg.source.path, cfg.storage.uri) == (f"{home}/lt", f"{home}/landing", f"{home}/shared/lt")
    assert cfg.landing_dir == Path("/home/someone/landing")
    cfg = load_config(overrides=["source.path=s3://bucket/~x", "storage.uri=s3://bucket/~y"])
    assert (cfg.source.path, cfg.storage.uri) == ("s3://bucket/~x", "s3://bucket/~y")


def test_overrides_may_stand_before_and_after_the_flags(tmp_path: Path):
    from livetrain.cli import _parse

    args = _parse(["config", "train.lr=0.5", "--config", str(tmp_path / "c.yaml"), "train.batch_size=8"])
    assert args.overrides == ["train.lr=0.5", "train.batch_size=8"] and args.config == tmp_path / "c.yaml"
    with pytest.raises(SystemExit):
        _parse(["config", "train.lr=0.5", "--bogus", "train.batch_size=8"])


def test_a_reader_that_went_away_ends_the_output_without_a_traceback():
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # `livetrain config | head -5` once head has exited
    proc = subprocess.run([sys.executable, "-m", "livetrain.cli", "config", "--help-fields"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""
