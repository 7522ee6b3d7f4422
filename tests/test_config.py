"""Config schema: defaults validate, bad keys and values are errors that name the key."""

from pathlib import Path

import pytest

from conf.schema import ConfigError, load_config


def test_default_config_is_valid_and_flattens_to_param_names():
    cfg = load_config()
    flat = cfg.flat()
    assert flat["train.optimizer"] == "adamw"
    assert flat["reduce.variance_target"] == 0.95
    assert "data.source" in flat and "registry.model_name" in flat


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None, ["train.epochs=3", "train.hidden=[64, 32]", "data.max_rows=100", "train.world_size=1"]
    )
    assert cfg.train.epochs == 3 and cfg.train.hidden == [64, 32]
    assert cfg.data.max_rows == 100 and cfg.train.world_size == 1


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.optimiser=sgd", "train.optimiser"),
        ("train.lr=-1", "train.lr"),
        ("train.optimizer=lion", "train.optimizer"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("compress.sparsity=1.0", "compress.sparsity"),
        ("train.world_size=0", "train.world_size"),
        ("bogus.key=1", "bogus"),
        ("train.clip_grad_norm=-1", "train.clip_grad_norm"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience"),
        ("train.warmup_epochs=15", "shorter than train.epochs"),
        ("train.scheduler=linear", "train.scheduler"),
        ("dask.memory_limit=1KiB", "dask.memory_limit"),
        ("dask.memory_limit=lots", "dask.memory_limit"),
        ("data.numeric_transform=log", "data.numeric_transform"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_cross_section_rule_is_explained():
    with pytest.raises(ConfigError, match="train.model 'cnn'.*reduce.method"):
        load_config(None, ["train.model=cnn", "reduce.method=pca"])
    assert load_config(None, ["train.model=cnn", "reduce.method=none"]).train.model == "cnn"
    assert load_config(None, ["train.model=cnn"]).reduce.method == "auto"  # passes pixels through


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_digest_tracks_every_value():
    a, b = load_config(), load_config(None, ["train.lr=0.01"])
    assert a.digest() == load_config().digest()
    assert a.digest() != b.digest()


def test_pipeline_yaml_documents_every_key_with_the_schema_default():
    import yaml

    from conf.schema import DEFAULT_CONFIG, PipelineConfig, flatten

    written = flatten(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    defaults = PipelineConfig().flat()
    # `compress.recipe: auto` fills compress.sweep with its model's grid once train.model
    # auto is decided (after ingest): the file says null
    grid = {k for k in defaults if k.startswith("compress.sweep.")}
    assert not grid and written["compress.sweep"] is None
    assert PipelineConfig().with_model_for([1, 28, 28]).compress.sweep
    # no key missing from (or unknown to) the file
    assert sorted(written) == sorted((set(defaults) - grid) | {"compress.sweep"})
    assert load_config().flat() == defaults


def test_an_unknown_profile_and_a_missing_environment_variable_are_named(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"profile 'nosuch' not found .*known profiles: \['cluster'"
    ):
        load_config(None, [], "nosuch")
    profile = tmp_path / "p.yaml"
    profile.write_text("tracking:\n  uri: ${ACCELFLOW_TEST_UNSET_URI}\n")
    monkeypatch.delenv("ACCELFLOW_TEST_UNSET_URI", raising=False)
    with pytest.raises(
        ConfigError, match=r"'tracking.uri' needs environment variable ACCELFLOW_TEST"
    ):
        load_config(None, [], str(profile))


def test_the_configuration_reference_is_generated_from_the_schema_and_current():
    """docs/configuration.md is `python -m conf.reference`: a key added to the schema
    without regenerating it (`make docs`) fails here; every key has a description."""
    from conf.reference import render
    from conf.schema import PipelineConfig

    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert page.read_text() == render(), "docs/configuration.md is stale: run `make docs`"
    for key in PipelineConfig().flat():
        if not key.startswith(("compress.sweep.", "tune.space.", "monitor.on_violation.")):
            # (entries of a documented dict key)
            assert f"`{key}`" in page.read_text(), key
    assert "|  |" not in render()  # no key without a description


def test_links_open_the_model_training_view_without_credentials():
    from conf.schema import model_link, run_link
    from tasks.tracking import source_label

    assert run_link("sqlite:///m.db", "1", "abc") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    )
    served = run_link("https://user:secret@mlflow.example.com:8443/", "2", "abc")
    assert served.startswith("https://mlflow.example.com:8443/#/experiments/2/runs/abc?")
    assert "secret" not in served
    assert model_link("http://h:5000", "m", "3").endswith(
        "/#/models/m/versions/3?workflowType=machine_learning"
    )
    assert source_label("/data/digits.csv.gz") == "digits"
    assert source_label("s3://key:secret@bucket/nightly/fashion-mnist/?x=1") == "fashion-mnist"


def test_model_auto_is_the_cnn_for_images_and_the_mlp_for_tables_and_pca():
    cfg = load_config(None, [])  # the default
    assert cfg.compress.sweep is None  # derived once the model is decided, after ingest
    assert cfg.train.epochs == "auto"  # so are the epochs: the family's own
    images = cfg.with_model_for([1, 28, 28])
    assert images.train.model == "cnn" and images.train.epochs == 8
    assert images.compress.sweep.recipes[0] == ["structured"]  # derived for the CNN now
    table = cfg.with_model_for(None)
    assert table.train.model == "mlp" and table.train.epochs == 15
    given = load_config(None, ["train.epochs=4"]).with_model_for([1, 28, 28])
    assert given.train.epochs == 4  # a number given is kept
    pca = load_config(None, ["train.model=auto", "reduce.method=pca"])
    assert pca.with_model_for([1, 28, 28]).train.model == "mlp"  # PCA features: the MLP
    named = load_config(None, ["train.model=rnn"])
    assert named.with_model_for([1, 28, 28]) is named
