"""The settings table (engine.settings) is what Config reads and what the README shows."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import Config, ConfigError
from engine.settings import ALIASES, SETTINGS, replace_block, settings_markdown, setting

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_holds_the_generated_tables():
    text = README.read_text()
    assert settings_markdown() in text, \
        "README.md's configuration tables differ: run python -m engine.settings --write README.md"
    assert replace_block(text) == text


def test_every_row_names_a_config_field_and_every_default_comes_from_the_table():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    rows = [s for s in SETTINGS if s.field]
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert len({s.field for s in rows}) == len(rows)
    for s in rows:
        assert s.field in fields, s.env
        assert fields[s.field].default == s.default, s.env
    assert Config.from_env({}) == Config()


@pytest.mark.parametrize("env, field, value", [
    ({"ENGINE_FETCHERS": " 3 "}, "fetchers", 3),
    ({"ENGINE_RANGE_MB": "0.5"}, "range_mb", 0.5),
    ({"ENGINE_HTTP2": "AUTO"}, "http2", "auto"),
    ({"ENGINE_PREWARM": "https://a.com/, ,https://b.com/"}, "prewarm",
     ("https://a.com/", "https://b.com/")),
    ({"ENGINE_SWS_THREADS": "0"}, "sws_threads", 0),
    ({"ENGINE_DEVICE": "CUDA:1"}, "device", "cuda:1"),
    ({"ENGINE_MAX_FRAMES": "all"}, "max_frames", None),
    ({"ENGINE_MAX_FRAMES": "40"}, "max_frames", 40),
    ({"ENGINE_RING_SLOTS": "2"}, "ring_slots", 2),
    ({"ENGINE_REPORT_SHA256": "1"}, "report_sha256", True),
    ({"ENGINE_DENY_PRIVATE": "1"}, "deny_private", True),
    ({"ENGINE_ALLOW_HOSTS": "A.com,*.b.com"}, "allow_hosts", ("a.com", "*.b.com")),
    ({"ENGINE_LOG_LEVEL": "debug"}, "log_level", "DEBUG"),
    ({"ENGINE_PROCESSOR": "m:f"}, "processor", "m:f"),
    ({"ENGINE_CLUSTER": " auto "}, "cluster", "auto"),
    ({"USE_CONNECTION_POOL": "0"}, "pooling", False),
    ({"PARTIAL_DOWNLOAD": "1"}, "partial_mb", 4.0),
    ({"PARTIAL_DOWNLOAD": "1", "PARTIAL_DOWNLOAD_MB": "6"}, "partial_mb", 6.0),
    ({"PARTIAL_DOWNLOAD_MB": "6"}, "partial_mb", None),
])
def test_each_kind_of_variable_is_read(env, field, value):
    assert getattr(Config.from_env(env), field) == value


@pytest.mark.parametrize("env, message", [
    ({"ENGINE_FETCHERS": "two"}, "ENGINE_FETCHERS='two' is not an integer"),
    ({"ENGINE_FETCHERS": "0"}, "ENGINE_FETCHERS=0 must be >= 1"),
    ({"ENGINE_RING_SLOTS": "1"}, "ENGINE_RING_SLOTS=1 must be >= 2"),
    ({"ENGINE_MAX_RSS_MB": "-1"}, "ENGINE_MAX_RSS_MB=-1 must be >= 0"),
    ({"ENGINE_RANGE_MB": "x"}, "ENGINE_RANGE_MB='x' is not a number"),
    ({"ENGINE_JOB_TIMEOUT_S": "0"}, "ENGINE_JOB_TIMEOUT_S=0.0 must be > 0"),
    ({"ENGINE_HTTP2": "2"}, "ENGINE_HTTP2='2': expected one of 0, 1, auto"),
    ({"ENGINE_DECODER": "cv2"}, "ENGINE_DECODER='cv2': expected one of auto, pyav, decord"),
    ({"ENGINE_LOG_LEVEL": "loud"}, "ENGINE_LOG_LEVEL='loud': expected one of debug, info"),
    ({"ENGINE_DEVICE": "tpu"}, "device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ({"ENGINE_MAX_FRAMES": "some"}, "ENGINE_MAX_FRAMES='some' is not an integer"),
    ({"PARTIAL_DOWNLOAD": "1", "PARTIAL_DOWNLOAD_MB": "0"}, "PARTIAL_DOWNLOAD_MB=0.0 must be > 0"),
])
def test_a_bad_value_is_one_line_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_ignored_seed_variables_leave_a_note_each():
    notes = Config.from_env({"CHUNKED_STREAMING": "1", "STREAM_BUFFER_TIMEOUT_S": "3"}).notes
    assert [n.split()[0] for n in notes] == ["CHUNKED_STREAMING", "STREAM_BUFFER_TIMEOUT_S"]


def test_the_tables_name_every_variable_and_alias():
    text = settings_markdown()
    assert all(f"`{s.env}`" in text for s in SETTINGS)
    assert all(name in text for name, _ in ALIASES)
    assert setting("ENGINE_MAX_BYTES").default == 512 * 1024 * 1024
