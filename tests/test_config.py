from __future__ import annotations

import pytest

from videoindex.config import ConfigError, load_config, output_affecting, to_dict


def test_yaml_then_cli_overrides_win(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: /in}\noutput: {uri: /out, shard_size: 10}\nmodel: {top_k: 3}\n")
    config = load_config(str(path), {"model.top_k": 7, "execution.batch_size": "4"})
    assert config.output.shard_size == 10
    assert config.model.top_k == 7
    assert config.execution.batch_size == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampling.strategy": "random"}, "sampling.strategy: 'random' is not one of"),
        ({"sampling.clip_stride": 0}, "sampling.clip_stride must be >= 1"),
        ({"execution.batch_size": "many"}, "execution.batch_size: expected int"),
        ({"model.colour": "red"}, "unknown key(s) ['colour']"),
        ({"output.uri": ""}, "output.uri: no output directory given"),
        ({"execution.decode_max_calls": -1}, "execution.decode_max_calls must be >= 0"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    base = {"input.uri": "/in", "output.uri": "/out"}
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base, **overrides})
    assert message in str(info.value)


def test_secrets_never_leave_to_dict():
    options = {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x"}}
    config = load_config(None, {"input.uri": "/in", "output.uri": "/out", "output.storage_options": options})
    text = str(to_dict(config))
    assert "s3cr3t" not in text and "AKIA123" not in text
    assert "http://x" in text


def test_output_affecting_ignores_execution():
    a = to_dict(load_config(None, {"input.uri": "/in", "output.uri": "/out", "execution.actors": 1}))
    b = to_dict(load_config(None, {"input.uri": "/in", "output.uri": "/out", "execution.actors": 4}))
    c = to_dict(load_config(None, {"input.uri": "/in", "output.uri": "/out", "sampling.clip_stride": 2}))
    assert output_affecting(a) == output_affecting(b)
    assert output_affecting(a) != output_affecting(c)


@pytest.mark.parametrize(
    "key", ["connection_string", "account_key", "sas_token", "signature", "client_secret", "auth", "password"]
)
def test_redact_hides_every_secret_looking_key(key):
    from videoindex.config import redact

    out = redact({key: "hunter2", "nested": {key: "hunter2"}, "endpoint_url": "http://x", "key_prefix": "p/"})
    assert "hunter2" not in str(out)
    assert out["endpoint_url"] == "http://x" and out["key_prefix"] == "p/"
