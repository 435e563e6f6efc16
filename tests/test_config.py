import pytest

from raybpo.config import Config, ConfigError, load_config


def test_defaults_follow_the_papers():
    cfg = load_config()
    assert (cfg.train.beta0, cfg.train.alpha, cfg.train.rho, cfg.train.momentum) == (0.1, 0.6, 0.8, 0.9)
    assert cfg.reward.momentum == 0.99 and cfg.breadth.eta == 0.1 and cfg.depth.projection_dim == 8192


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: /tmp/x\ntrain:\n  beta0: 0.3\n  loss: ipo\n")
    cfg = load_config(path, ["train.beta0=0.2", "depth.budget=100", "train.lora_target_modules=[q_proj]"])
    assert cfg.run_dir == "/tmp/x"
    assert cfg.train.beta0 == 0.2 and cfg.train.loss == "ipo"
    assert cfg.depth.budget == 100 and cfg.train.lora_target_modules == ["q_proj"]


def test_unknown_key_names_the_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.betta0=0.2"])
    message = str(err.value)
    assert "unknown key 'train.betta0'" in message
    assert "did you mean 'beta0'" in message
    assert "alpha" in message and "rho" in message


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.beta0=0.2"])


def test_bad_value_names_the_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.loss=hinge"])
    assert "train.loss" in str(err.value) and "'dpo'" in str(err.value) and "'ipo'" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.rho.*less than or equal to 1"):
        load_config(None, ["train.rho=1.5"])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.beta0"])
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(None, ["seed=3", "seed.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_columns_format_needs_a_mapping():
    with pytest.raises(ConfigError, match="format=columns needs a `columns` mapping"):
        load_config(None, ["ingest.sources=[{path: a.jsonl, format: columns}]"])


def test_section_hash_depends_only_on_its_sections():
    base = Config()
    other_train = load_config(None, ["train.beta0=0.5"])
    assert base.section_hash("ingest") == other_train.section_hash("ingest")
    assert base.section_hash("train") != other_train.section_hash("train")
    assert base.section_hash("ingest") != load_config(None, ["seed=1"]).section_hash("ingest")


def test_actor_pools_are_a_fixed_size_or_autoscale_between_min_and_max():
    import pyarrow as pa
    import ray.data

    from raybpo.cluster import actor_blocks, actor_pool

    cfg = load_config(None, ["generate.concurrency=[1, 4]", "depth.concurrency=3"])
    assert cfg.generate.concurrency == (1, 4) and cfg.depth.concurrency == 3
    autoscaling, fixed = actor_pool(cfg.generate.concurrency), actor_pool(cfg.depth.concurrency)
    assert isinstance(autoscaling, ray.data.ActorPoolStrategy)
    assert (autoscaling.min_size, autoscaling.max_size) == (1, 4) and fixed.min_size == fixed.max_size == 3
    for bad in ("[3, 2]", "[0, 2]", "0"):
        with pytest.raises(ConfigError, match=r"generate\.concurrency: .*N actors"):
            load_config(None, [f"generate.concurrency={bad}"])
    # blocks are cut for the most actors the pool may have
    table = pa.table({"x": list(range(64))})
    assert len(actor_blocks(table, 2, (1, 4))) == len(actor_blocks(table, 2, 4)) == 16


def test_an_override_that_is_not_yaml_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"override 'train.lora_target_modules=\[q_proj': .* not valid YAML"):
        load_config(None, ["train.lora_target_modules=[q_proj"])


@pytest.mark.parametrize("name", ["../reward", "a/b", "a\\b", ".hidden", " "])
def test_a_source_name_is_one_folder_name(name):
    """Names become folders (the reward model of each source): none may climb out of its folder."""
    source = f"ingest.sources=[{{path: pairs.jsonl, name: {name!r}}}]"
    with pytest.raises(ConfigError, match=r"ingest\.sources\.0\.name: .*must be one folder name"):
        load_config(None, [source])
    assert load_config(None, ["ingest.sources=[{path: pairs.jsonl, name: hh-helpful.v2}]"]).ingest.sources[0].name


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.openai.com/v1", True),
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://judge.example.com/v1", False),
        ("http://10.0.0.7:8000/v1", False),
        ("ftp://127.0.0.1/v1", False),
    ],
)
def test_the_judge_key_never_travels_over_plain_http_off_this_machine(url, allowed):
    overrides = [f"score.judge.url={url}", f"evaluate.llm_judge={{url: '{url}'}}"]
    for override in overrides:
        if allowed:
            load_config(None, [override])
        else:
            with pytest.raises(ConfigError, match=r"judge url .* must be https://"):
                load_config(None, [override])
